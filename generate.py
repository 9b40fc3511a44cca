"""Ask the fine-tuned model: the base model, the trained adapters put into it, and generation.

    python generate.py --adapter out/adapter "Can Babal swim? Answer format: true/false"
    python generate.py --adapter out/adapter --file questions.txt     # one prompt per line
    python generate.py --adapter out/adapter                          # an interactive loop
    python generate.py --adapter out/adapter --no-adapter "..."       # the base model, to compare

The base model is the one the adapters were trained on (their adapter_config.json says which;
--model overrides it). Each prompt goes through the training template (data.prompt) unless --raw,
and the answer streams as it is generated: greedy by default, until the model's end of sequence.
PEFT LoRA adapter folders work too. Loading and checking the files is plumbing/; the lesson is
four lines: load the base, add the experts, load their weights, generate.
"""
import sys
from pathlib import Path

import torch

import data
import omoe
from model import Transformer
from plumbing.base import hub
from plumbing import adapters, cli
from plumbing.base.errors import BadInput
from plumbing.gate import load_tokenizer, pick_device


def parse_args(argv=None):
    p = cli.ArgumentParser(prog="generate.py", formatter_class=cli.HelpFormatter,
                           description="Ask a model fine-tuned by train.py (or a PEFT LoRA).")
    p.add_argument("prompts", nargs="*", help="questions to ask (none, no --file: ask in a loop)")
    p.add_argument("--adapter", default="out/adapter", help="the adapter folder a run wrote")
    p.add_argument("--no-adapter", action="store_true", help="answer with the base model alone")
    p.add_argument("--model", default=None, help="the base model (default: the one the adapters "
                   "were trained on): a folder, a cache folder or a hub id")
    p.add_argument("--revision", default=None, help="with a hub id: the branch, tag or commit")
    p.add_argument("--tokenizer", default=None, help="a tokenizer outside the model's folder")
    p.add_argument("--file", default=None, help="a text file of prompts, one per line")
    p.add_argument("--raw", action="store_true", help="the prompt as it is, without the template")
    p.add_argument("--max-new-tokens", type=int, default=64, help="the longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy; above, sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the likeliest tokens "
                   "whose probabilities reach this (with --temperature)")
    p.add_argument("--seed", type=int, default=0, help="for sampling")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="of the base (auto: bfloat16 on CUDA)")
    args = p.parse_args(argv)
    for flag, bad in (("--max-new-tokens", args.max_new_tokens < 1),
                      ("--temperature", not 0 <= args.temperature < float("inf")),
                      ("--top-p", not 0 < args.top_p <= 1)):
        if bad:
            p.error(f"{flag} {getattr(args, flag[2:].replace('-', '_'))}: out of range")
    return args


def load(args):
    """The model with its adapters (or without, --no-adapter), and its tokenizer, all checked."""
    saved = Path(args.adapter, adapters.ADAPTER_CONFIG).is_file()
    trained = read_config(args.adapter) if saved or not args.no_adapter else None
    name = args.model or (trained or {}).get("base_model")
    if name is None:
        raise BadInput("--model: the adapters do not say which model they were trained on; name it"
                       if trained else "--model is needed with --no-adapter and no adapter folder")
    model_dir = hub.resolve_model(name, args.revision)
    device = pick_device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "auto": torch.bfloat16 if device.type == "cuda" else torch.float32}[args.dtype]
    tokenizer = load_tokenizer(args.tokenizer, model_dir)
    model = Transformer.from_pretrained(model_dir, dtype=dtype, device=device)
    if not args.no_adapter:
        layout, weights = adapters.load_adapter_files(args.adapter)
        omoe.add_experts(model, **layout)   # the experts, as the run built them
        adapters.load_adapters(model, weights)  # and their trained weights
    return model.eval(), tokenizer


def read_config(directory) -> dict:
    try:
        return adapters.read_adapter_config(directory)
    except BadInput as e:
        raise BadInput(f"--adapter {directory}: {e}") from None


def answer(model, tokenizer, text: str, args) -> str:
    """Generate the answer to one prompt, printing it as it comes."""
    prompt = text if args.raw else data.prompt(data.Example(instruction=text))
    ids = tokenizer.encode(prompt)
    device = next(model.parameters()).device
    new: list[int] = []
    shown = ""

    def stream(token):  # decode everything so far: a piece may need the next one to be text
        nonlocal shown
        new.append(int(token[0]))
        text = tokenizer.decode([t for t in new if t not in tokenizer.stop_ids])
        print(text[len(shown):], end="", flush=True)
        shown = text

    torch.manual_seed(args.seed)
    model.generate(torch.tensor([ids], device=device), max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_p=args.top_p, eos_id=tokenizer.stop_ids,
                   on_token=stream)
    print()
    return shown


def prompts(args):
    """The prompts of the command line, of --file, or typed one by one."""
    if args.prompts or args.file:
        yield from args.prompts
        if args.file:
            yield from read_prompts(args.file)
        return
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and not line:
            return
        if line.strip():
            yield line.strip()


def read_prompts(path) -> list[str]:
    try:
        return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()
                if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or e
        raise BadInput(f"--file {path}: cannot read it ({why})") from None


def run(args) -> int:
    model, tokenizer = load(args)
    with torch.no_grad():
        for text in prompts(args):
            answer(model, tokenizer, text, args)
    return 0


def main(argv=None) -> int:
    return cli.run_command(run, parse_args(argv), prog="generate.py")


if __name__ == "__main__":
    sys.exit(main())
