"""Evaluate trained adapters: the base model, the adapters put into it, and
data.py's scoring.

    python evaluate.py                      # out/adapter, on the embedded tasks
    python evaluate.py --adapter runs/a/adapter --eval-data dataset/ --out runs/a
    python train.py --eval-only ...         # the same, with train.py's flags

The base model is the one the adapters were trained on (their
adapter_config.json says which; --model overrides it), as in generate.py.
The results go to <out>/eval-<data>.json, beside the run's own files,
which are left as they are.

Every input is checked before any work by the gate every door shares
(plumbing/gate.py). The lesson is: load the base, add the experts, load
their weights, evaluate.
"""
import sys

import data
import omoe
from model import Transformer
from plumbing import cli, gate, parallel, run_folder


def run(args) -> int:
    # The device and the processes; --out is locked.
    env = gate.setup(args, training=False)
    try:
        # The base, tokenizer, adapters and data, all checked.
        inputs = gate.load_evaluation(args, env)
        model = load_model(args, env, inputs)
        # Under --fsdp the experts were added before sharding.
        if not args.fsdp:
            omoe.add_experts(model, **inputs.adapter[0])
        parallel.load_adapters(model, inputs.adapter[1])
        test, val = (evaluate(model, inputs.tokenizer, tasks, args, env)
                     if tasks else {}
                     for tasks in (inputs.eval_sets, inputs.val_sets))
        if env.main:
            report(args, env, inputs, test, val)
        return 0
    finally:
        if env.lock:
            env.lock.release()


def load_model(args, env, inputs):
    """The base; under --fsdp sharded, with the experts already in (see
    plumbing/parallel.py)."""
    if args.fsdp:
        return parallel.load_sharded(inputs.model_dir, env.dtype, env.device,
                                     args.seed, inputs.adapter[0])
    return Transformer.from_pretrained(inputs.model_dir, dtype=env.dtype,
                                       device=env.device)


def evaluate(model, tokenizer, tasks, args, env) -> dict:
    """Accuracy per task; with several processes, each answers its share of
    the examples."""
    with env.autocast:
        return data.evaluate_tasks(model, tokenizer, tasks, args.eval_mode,
                                   args.eval_batch_size,
                                   shared=parallel.shared_answers(env.device))


def report(args, env, inputs, test: dict, val: dict) -> None:
    if val:
        cli.print_table(None, val, cli.VAL_TITLE)
    if test:
        cli.print_table(None, test)
    run_folder.record(env.out, [inputs.results.name])
    run_folder.write_json(inputs.results, {
        "config": vars(args), "adapter": inputs.adapter[0],
        "base": inputs.base, "after": test, "val_after": val,
        "average": {"after": cli.average(test), "val_after": cli.average(val)},
        "environment": run_folder.environment(env.device)},
        replace=args.overwrite)
    print(f"\nresults: {inputs.results}")


def main(argv=None) -> int:
    return cli.run_command(run, cli.parse_eval_args(argv), prog="evaluate.py")


if __name__ == "__main__":
    sys.exit(main())
