"""Ask the fine-tuned model: the base model, the trained adapters put into
it, and generation.

    python generate.py "Can Babal swim? Answer format: true/false"
    python generate.py --file questions.txt      # one prompt per line
    python generate.py                           # an interactive loop
    python generate.py --no-adapter "..."        # the base model, to compare
    python generate.py --adapter runs/a/adapter  # another run's adapters

The adapters are out/adapter's unless --adapter names others. The base
model is the one they were trained on (their adapter_config.json says
which; --model overrides it). Each prompt goes
through the training template (data.prompt) unless --raw, and the answer
streams as it is generated: greedy by default, until the model's end of
sequence. PEFT LoRA adapter folders work too.

Every input (the base, its tokenizer, the adapters, each prompt) is checked
before any work by the gate every door shares (plumbing/gate.py). The
lesson is four lines: load the base, add the experts, load their weights,
generate.

The embedded tiny model knows only its six tasks: it answers questions
written like theirs (the first example above; assets/README.md has the six
formats), and free-form questions get quiz-shaped nonsense. The interactive
loop ends with Ctrl-D (Windows: Ctrl-Z, Enter), "exit" or Ctrl-C.
"""
import sys
from pathlib import Path

import torch

import omoe
from model import Transformer
from plumbing import adapters, cli, gate
from plumbing.base.errors import BadInput

EMBEDDED = Path(__file__).resolve().parent / "assets" / "tiny-llama"
EMBEDDED_HINT = ("the embedded tiny model answers only questions written "
                 "like its six tasks (assets/README.md), such as: Please "
                 "answer the following question with true or false, "
                 "question: can Babal swim? Answer format: true/false")
LOOP_HINT = ("type a question and press Enter; leave with Ctrl-D "
             "(Windows: Ctrl-Z, Enter) or exit")


def parse_args(argv=None):
    p = cli.ArgumentParser(
        prog="generate.py", formatter_class=cli.HelpFormatter,
        description="Ask a model fine-tuned by train.py (or a PEFT LoRA).")
    p.add_argument("prompts", nargs="*",
                   help="questions to ask (none, no --file: ask in a loop)")
    p.add_argument("--adapter", default="out/adapter",
                   help="the adapter folder a run wrote")
    p.add_argument("--no-adapter", action="store_true",
                   help="answer with the base model alone")
    p.add_argument("--model", default=None,
                   help="the base model (default: the one the adapters were "
                   "trained on): a folder, a cache folder or a hub id")
    p.add_argument("--revision", default=None,
                   help="with a hub id: the branch, tag or commit")
    p.add_argument("--tokenizer", default=None,
                   help="a tokenizer outside the model's folder")
    p.add_argument("--file", default=None,
                   help="a text file of prompts, one per line")
    p.add_argument("--raw", action="store_true",
                   help="the prompt as it is, without the template")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="the longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 is greedy; above, sampling")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the likeliest tokens whose "
                   "probabilities reach this (with --temperature)")
    p.add_argument("--seed", type=int, default=0, help="for sampling")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"),
                   default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                   default="auto", help="of the base (auto: bfloat16 on CUDA)")
    args = p.parse_args(argv)
    try:
        gate.check_generation_flags(args)
    except BadInput as e:
        p.error(str(e))
    return args


def load(args, base, adapter, device, dtype):
    """The model with its adapters, or without them (--no-adapter). The
    files were checked already."""
    model = Transformer.from_pretrained(base.model_dir, dtype=dtype,
                                       device=device)
    if adapter is not None:
        layout, weights = adapter
        # The experts, as the run built them, and their trained weights.
        omoe.add_experts(model, **layout)
        adapters.load_adapters(model, weights)
    return model.eval()


def answer(model, tokenizer, ids: list[int], args) -> str:
    """Generate the answer to one prompt (its tokens), printing it as it
    comes."""
    device = next(model.parameters()).device
    new: list[int] = []
    shown = ""

    # Decode everything so far: a piece may need the next one to be text.
    def stream(token):
        nonlocal shown
        new.append(int(token[0]))
        text = tokenizer.decode([t for t in new if t not in tokenizer.stop_ids])
        print(text[len(shown):], end="", flush=True)
        shown = text

    torch.manual_seed(args.seed)
    model.generate(torch.tensor([ids], device=device),
                   max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_p=args.top_p,
                   eos_id=tokenizer.stop_ids, on_token=stream)
    print()
    return shown


def prompts(args):
    """(where, text) for the prompts of the command line and of --file, or
    None for those typed one by one (read as they come)."""
    if not (args.prompts or args.file):
        return None
    given = [(f"prompt {i + 1}", text) for i, text in enumerate(args.prompts)]
    return given + (gate.read_prompts(args.file) if args.file else [])


def typed():
    """The prompts of standard input, one per line, as they are typed."""
    interactive = sys.stdin.isatty()
    if interactive:
        print(LOOP_HINT, file=sys.stderr)
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        except UnicodeDecodeError as e:
            raise BadInput(f"standard input: not UTF-8 text (byte "
                           f"0x{e.object[e.start]:02x}; a Latin-1 terminal "
                           f"or file?)") from None
        # An empty read is the end of the file or pipe.
        if not interactive and not line:
            return
        if interactive and line.strip() in ("exit", "quit"):
            return
        if line.strip():
            yield "standard input", line.strip()


def run(args) -> int:
    # Every file is checked here, before any weight is read.
    base, adapter, device, dtype = gate.load_generation(args)
    if Path(base.model_dir).resolve() == EMBEDDED:
        print(EMBEDDED_HINT, file=sys.stderr)
    given = prompts(args)
    checked = [gate.prompt_ids(base, text, where, args)
               for where, text in given or []]
    model = load(args, base, adapter, device, dtype)
    with torch.no_grad():
        for ids in checked:
            answer(model, base.tokenizer, ids, args)
        for where, text in typed() if given is None else []:
            answer(model, base.tokenizer,
                   gate.prompt_ids(base, text, where, args), args)
    return 0


def main(argv=None) -> int:
    return cli.run_command(run, parse_args(argv), prog="generate.py")


if __name__ == "__main__":
    sys.exit(main())
