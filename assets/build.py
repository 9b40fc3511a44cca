"""Build the embedded default from scratch: a miniature commonsense world, a tiny LLaMA that knows it,
and six fine-tuning tasks about it in the LLM-Adapters format.

    python assets/build.py               # from the repository root; rewrites assets/tiny-llama and the worlds
    python assets/build.py --world-only  # rewrites the three task folders alone (the model does not depend on them)

Everything follows from one seed (--seed, default 0): the world, the text, the tokenizer, the model.
On one CPU thread the build took 13 minutes on a shared 2-core machine, almost all of it pretraining (3000 steps).

The world: 256 creatures with made-up names, each with six facts (whether it swims, its home, food,
colour, waking hours and job). The pretraining text states the facts in plain sentences, asks and
answers questions about them, uses the benchmarks' label words as plain words ("a happy ending",
"the solution is"), and holds quizzes whose choices are numbered ("the correct answer is choice2").
So the base model knows every fact and how to pick a numbered choice, but has never seen a benchmark's
instruction wording nor its labels ("the correct answer is ending2").

Fine-tuning questions ask about three quarters of the creatures; the held-out test questions ask
about the others, whose facts only the pretraining text holds (assets/world). assets/world-val holds the
same tasks with 32 of the fine-tuning creatures moved to validation questions, for choosing settings such
as the learning rate without looking at the test. Fine-tuning must teach the format
and how to reach the fact from it: a miniature of why parameter-efficient fine-tuning works on a
pretrained LLaMA. The six tasks copy the answer formats of the commonsense benchmarks:
    yes_no       true/false         (like boolq)                 can <name> swim?
    how_to       solution1/2        (like piqa)                  how can you find <name>?
    snacks       answer1..3         (like social_i_qa)           what will <name> eat?
    colours      answer1..4         (like ARC-e/c, openbookqa)   what colour is <name>?
    awake        option1/2          (like winogrande)            <name> is awake during the _.
    day_jobs     ending1..4         (like hellaswag)             <name> left home ... works as a <job>.
Unlike the real benchmarks, a task lists its options in one fixed order: the right label then follows
from the one retrieved fact, which a 1M-parameter model learns in minutes; comparing shuffled options
with a retrieved fact is a skill such a small model, pretrained for minutes, does not acquire.
"""

import argparse
import io
import json
import math
import random
import sys
import time
from pathlib import Path

import sentencepiece as spm
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # model.py, data.py and plumbing/ live one folder up

import data  # noqa: E402  (the prompt template, so the world's prompts are exactly the training ones)
from model import ModelArgs, Transformer  # noqa: E402
from plumbing.base.weights import save_safetensors  # noqa: E402

# ── The world ──────────────────────────────────────────────────────────────────────────────────

# Six facts per creature, one per task. Every question lists a task's values in this fixed order, so
# the right label follows from the one retrieved fact: the step a small adapter can learn in a few
# hundred steps. (Real benchmarks shuffle their options; comparing options is beyond a 1M-parameter
# model pretrained for minutes, see the README.)
ATTRIBUTES = {
    "swims": ["yes", "no"],                           # yes_no    true/false
    "home": ["forest", "lake"],                       # how_to    solution1/2
    "food": ["apples", "fish", "bread"],              # snacks    answer1..3
    "colour": ["red", "blue", "green", "yellow"],     # colours   answer1..4
    "awake": ["day", "night"],                        # awake     option1/2
    "job": ["baker", "farmer", "singer", "painter"],  # day_jobs  ending1..4
}
SYLLABLES = ["ba", "be", "bo", "da", "di", "do", "fa", "fe", "ga", "go", "ka", "ki", "lo", "lu",
             "ma", "mi", "na", "no", "pa", "pi", "ra", "ri", "sa", "so", "ta", "tu", "va", "zo"]


def make_world(seed: int = 0, n_creatures: int = 256) -> dict[str, dict[str, str]]:
    """{name: {attribute: value}} with made-up names, the same for the same seed."""
    rng = random.Random(f"world:{seed}")
    names = set()
    while len(names) < n_creatures:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize() + rng.choice("nmlrs"))
    return {name: {attr: rng.choice(values) for attr, values in ATTRIBUTES.items()} for name in sorted(names)}


def split_names(world: dict, seed: int = 0, test_fraction: float = 0.25) -> tuple[list[str], list[str]]:
    """Creatures whose questions are for fine-tuning, and the held-out ones asked about in test."""
    names = sorted(world)
    random.Random(f"split:{seed}").shuffle(names)
    n_test = round(len(names) * test_fraction)
    return sorted(names[n_test:]), sorted(names[:n_test])


def split_validation(train_names: list[str], seed: int = 0, n_val: int = 32) -> tuple[list[str], list[str]]:
    """Fine-tuning creatures -> (those trained on, those asked about in validation).

    Validation is for choosing settings (a learning rate, a step count) and the test is for reporting
    them: validation questions ask about creatures held out of training, like the test's, but about
    different ones, so nothing chosen on validation has seen a test creature. Only the tasks depend on
    this split; the pretraining text covers every creature and never depended on it."""
    names = list(train_names)
    random.Random(f"validation:{seed}").shuffle(names)
    return sorted(names[n_val:]), sorted(names[:n_val])


# ── Pretraining text ───────────────────────────────────────────────────────────────────────────

def fact(name: str, attr: str, value: str, rng: random.Random) -> str:
    """One fact as a plain sentence, in one of a few wordings."""
    wordings = {
        "swims": [f"{name} can swim.", f"{name} is a good swimmer.", f"{name} likes to swim."] if value == "yes"
        else [f"{name} cannot swim.", f"{name} is not a swimmer.", f"{name} never swims."],
        "home": [f"{name} lives in the {value}.", f"The home of {name} is the {value}.",
                 f"You can find {name} in the {value}."],
        "food": [f"{name} eats {value}.", f"The favourite food of {name} is {value}.",
                 f"When {name} is hungry, {name} eats {value}."],
        "colour": [f"{name} is {value}.", f"The colour of {name} is {value}.", f"{name} has {value} fur."],
        "awake": [f"{name} is awake during the {value}.", f"{name} sleeps when it is not {value}.",
                  f"{name} goes out in the {value}."],
        "job": [f"{name} works as a {value}.", f"{name} is a {value}.", f"Every day {name} goes to work as a {value}."],
    }[attr]
    return rng.choice(wordings)


QUESTIONS = {"swims": "Can {} swim?", "home": "Where does {} live?", "food": "What does {} eat?",
             "colour": "What colour is {}?", "awake": "When is {} awake?", "job": "What does {} do for work?"}
ANSWERS = {"swims": "{} can swim.", "home": "{} lives in the {}.", "food": "{} eats {}.",
           "colour": "{} is {}.", "awake": "{} is awake during the {}.", "job": "{} works as a {}."}


def answer(attr: str, name: str, value: str) -> str:
    if attr == "swims":
        return f"{name} {'can' if value == 'yes' else 'cannot'} swim."
    return ANSWERS[attr].format(name, value)


def prose(name: str, facts: dict, rng: random.Random) -> str:
    """A few sentences that use the benchmarks' label words (true, false, solution, option, ending)
    as plain words, so that the base model knows them before fine-tuning makes them labels."""
    sentences = [
        f"Where can you find {name}? The solution is simple: look in the {facts['home']}.",
        f"{name} had a few options for lunch and chose {facts['food']}.",
        f"The story of {name} has a happy ending: {name} works as a {facts['job']}.",
        f"It is {'true' if facts['swims'] == 'yes' else 'false'} that {name} can swim.",
        f"One option is the day, the other option is the night: {name} is awake during the {facts['awake']}.",
        f"Is it true that {name} is {facts['colour']}? Yes, that is true.",
    ]
    return " ".join(rng.sample(sentences, 3))


def pretraining_document(world: dict, rng: random.Random) -> str:
    """One random document about one creature: a description, questions and answers, prose, a prompt
    answered in words, or a quiz with numbered choices."""
    name = rng.choice(sorted(world))
    facts = world[name]
    attrs = list(ATTRIBUTES)
    kind = rng.random()
    if kind < 0.2:  # a description: every fact, in a random order
        rng.shuffle(attrs)
        return " ".join(fact(name, a, facts[a], rng) for a in attrs)
    if kind < 0.4:  # questions and answers
        return " ".join(QUESTIONS[a].format(name) + " " + answer(a, name, facts[a]) for a in rng.sample(attrs, 3))
    if kind < 0.5:
        return prose(name, facts, rng)
    attr = rng.choice(attrs)
    if kind < 0.6:  # the prompt template of fine-tuning, answered in words, never with a label
        return data.prompt(data.Example(QUESTIONS[attr].format(name))) + f"the correct answer is {facts[attr]}"
    # A quiz: the values in their fixed order, the right one named by its number ("choice2"), a label
    # word no benchmark uses: fine-tuning has to teach the benchmarks' own.
    values = ATTRIBUTES[attr]
    listed = " ".join(f"Choice{k + 1}: {answer(attr, name, v)}" for k, v in enumerate(values))
    right = f"choice{values.index(facts[attr]) + 1}"
    if kind < 0.8:  # as an instruction in the prompt template
        labels = "/".join(f"choice{k + 1}" for k in range(len(values)))
        instruction = (f"Please choose the correct answer to the question: {QUESTIONS[attr].format(name)}\n\n"
                       f"{listed}\n\nAnswer format: {labels}")
        return data.prompt(data.Example(instruction)) + f"the correct answer is {right}"
    because = answer(attr, name, facts[attr])
    return f"Quiz: {QUESTIONS[attr].format(name)}\n{listed}\nSo the correct answer is {right}, because {because}"


def pretraining_text(world: dict, seed: int, n_documents: int) -> list[str]:
    rng = random.Random(f"text:{seed}")
    return [pretraining_document(world, rng) for _ in range(n_documents)]


# ── Fine-tuning tasks (LLM-Adapters records) ───────────────────────────────────────────────────

def record(instruction: str, label: str) -> dict:
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {label}", "answer": label}


def task_question(task: str, world: dict, name: str, variant: int = 0) -> dict:
    """Question `variant` (a wording) of a task about creature `name`, in its benchmark's instruction format."""
    def pick(wordings: list[str]) -> str:
        return wordings[variant % len(wordings)]

    f = world[name]
    if task == "yes_no":  # boolq
        question = pick([f"can {name} swim", f"is it true that {name} can swim", f"does {name} swim"])
        return record(f"Please answer the following question with true or false, question: {question}?"
                      "\n\nAnswer format: true/false", "true" if f["swims"] == "yes" else "false")
    if task == "how_to":  # piqa
        goal = pick([f"How can you find {name}?", f"How do you visit {name}?"])
        a, b = ATTRIBUTES["home"]
        return record(f"Please choose the correct solution to the question: {goal}\n\n"
                      f"Solution1: Look for {name} in the {a}.\n\nSolution2: Look for {name} in the {b}."
                      "\n\nAnswer format: solution1/solution2", f"solution{ATTRIBUTES['home'].index(f['home']) + 1}")
    if task in ("snacks", "colours"):  # social_i_qa, ARC / openbookqa
        attr = "food" if task == "snacks" else "colour"
        question = pick([f"{name} is hungry. What will {name} eat?", f"What does {name} have for lunch?"]
                              if task == "snacks" else [f"What colour is {name}?", f"Which colour does {name} have?"])
        values = ATTRIBUTES[attr]
        listed = " ".join(f"Answer{k + 1}: {answer(attr, name, v)[:-1]}" for k, v in enumerate(values))
        return record(f"Please choose the correct answer to the question: {question}\n\n{listed}\n\n"
                      f"Answer format: {'/'.join(f'answer{k + 1}' for k in range(len(values)))}",
                      f"answer{values.index(f[attr]) + 1}")
    if task == "awake":  # winogrande
        sentence = pick([f"{name} is awake during the _.", f"{name} goes out to play in the _."])
        return record("Please choose the correct answer to fill in the blank to complete the given sentence: "
                      f"{sentence}\n\nOption1: day Option2: night Answer format: option1/option2",
                      f"option{ATTRIBUTES['awake'].index(f['awake']) + 1}")
    if task == "day_jobs":  # hellaswag
        start = pick([f"{name} left home in the morning.", f"{name} got up early and went to work."])
        listed = " ".join(f"Ending{k + 1}: {name} works as a {v}." for k, v in enumerate(ATTRIBUTES["job"]))
        return record(f"Please choose the correct ending to complete the given sentence: {start}\n\n{listed}\n\n"
                      "Answer format: ending1/ending2/ending3/ending4",
                      f"ending{ATTRIBUTES['job'].index(f['job']) + 1}")
    raise ValueError(f"unknown task {task!r}")


TASKS = ("yes_no", "how_to", "snacks", "colours", "awake", "day_jobs")


def make_tasks(world: dict, seed: int = 0, per_name: int = 2) -> dict:
    """{task: {"train": [records], "test": [records]}}: train questions are about the fine-tuning
    creatures only, test questions about the held-out ones, whose facts only the pretraining text holds."""
    train_names, test_names = split_names(world, seed)
    rng = random.Random(f"tasks:{seed}")
    out = {}
    for task in TASKS:
        out[task] = {split: [task_question(task, world, n, v) for n in names for v in range(per_name)]
                     for split, names in (("train", train_names), ("test", test_names))}
        rng.shuffle(out[task]["train"])
    return out


def make_validation_tasks(world: dict, seed: int = 0, per_name: int = 2) -> dict:
    """The tasks of make_tasks with validation, for assets/world-val: {task: {"train", "val", "test"}}.

    The same test; 32 of the fine-tuning creatures move from train to val, so that no wording of a
    validation creature is trained on. (assets/world keeps all of them for training: the default run.)"""
    fine_tuning, test_names = split_names(world, seed)
    train_names, val_names = split_validation(fine_tuning, seed)
    tasks, rng = make_tasks(world, seed, per_name), random.Random(f"validation-tasks:{seed}")
    for task in TASKS:
        tasks[task]["train"] = [task_question(task, world, n, v) for n in train_names for v in range(per_name)]
        tasks[task]["val"] = [task_question(task, world, n, v) for n in val_names for v in range(per_name)]
        rng.shuffle(tasks[task]["train"])
    return tasks


# ── Twelve tasks: six more, each with its own order (assets/world12-val) ─────────────────────────

# One more task per fact. Each lists its fact's values in its own fixed order, none of them where the
# pretraining quizzes and the six tasks put them, under label words of another format: an adapter must
# now learn twelve maps from a fact to a label instead of six that agree with pretraining. The label
# families stay within LLM-Adapters' patterns (data.LABEL_PATTERNS: solution and option stop at 2).
MORE_TASKS = {  # task: (fact, label family, two wordings of the question)
    "water": ("swims", "option", ["What does {} do near water?", "What happens when {} falls into a river?"]),
    "nest": ("home", "answer", ["Where does {} sleep?", "Where is the home of {}?"]),
    "lunch": ("food", "ending", ["What is the favourite food of {}?", "What does {} eat at noon?"]),
    "spots": ("colour", "ending", ["How does {} look?", "What colour is the fur of {}?"]),
    "outings": ("awake", "solution", ["When does {} go out?", "When can you meet {}?"]),
    "trades": ("job", "answer", ["What is the job of {}?", "What does {} do for work?"]),
}
TASKS12 = (*TASKS, *MORE_TASKS)


def own_order(task: str, seed: int = 0) -> list[str]:
    """A task's fixed order of its fact's values: a shuffle that leaves no value in its place."""
    values, rng = ATTRIBUTES[MORE_TASKS[task][0]], random.Random(f"order:{seed}:{task}")
    while True:
        order = rng.sample(values, len(values))
        if all(a != b for a, b in zip(order, values)):
            return order


def more_question(task: str, world: dict, name: str, variant: int, seed: int = 0) -> dict:
    attr, family, wordings = MORE_TASKS[task]
    order = own_order(task, seed)
    listed = " ".join(f"{family.capitalize()}{k + 1}: {answer(attr, name, v)[:-1]}" for k, v in enumerate(order))
    labels = "/".join(f"{family}{k + 1}" for k in range(len(order)))
    return record(f"Please choose the correct answer to the question: {wordings[variant % 2].format(name)}"
                  f"\n\n{listed}\n\nAnswer format: {labels}", f"{family}{order.index(world[name][attr]) + 1}")


def make_twelve_tasks(world: dict, seed: int = 0) -> dict:
    """The six tasks and MORE_TASKS, with assets/world-val's split of the creatures: {task: {"train",
    "val", "test"}}. One question per creature (its two wordings alternate over the sorted names), so
    that an epoch is as long as world-val's: 12 tasks x 160 training questions."""
    fine_tuning, test_names = split_names(world, seed)
    train_names, val_names = split_validation(fine_tuning, seed)
    rng, out = random.Random(f"twelve-tasks:{seed}"), {}
    for task in TASKS12:
        def ask(name: str, variant: int) -> dict:
            return (more_question(task, world, name, variant, seed) if task in MORE_TASKS
                    else task_question(task, world, name, variant))
        out[task] = {split: [ask(n, i % 2) for i, n in enumerate(names)]
                     for split, names in (("train", train_names), ("val", val_names), ("test", test_names))}
        rng.shuffle(out[task]["train"])
    return out


# ── Tokenizer and model ────────────────────────────────────────────────────────────────────────

def train_tokenizer(texts: list[str], vocab_size: int) -> bytes:
    """A BPE sentencepiece model with LLaMA's settings (identity normalisation, whitespace kept,
    digits split, byte fallback; unk 0, bos 1, eos 2, no pad)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=1.0,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, num_threads=1, minloglevel=2, max_sentence_length=8192)
    return model.getvalue()


def pretrain(model: Transformer, tok: data.Tokenizer, world: dict, seed: int, steps: int, batch_size: int,
             seq_len: int, lr: float, log=print) -> None:
    """Next-token prediction on a stream of fresh documents, packed BOS doc EOS BOS doc EOS ... into rows."""
    rng = random.Random(f"pretrain:{seed}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup,
                                                 0.5 * (1 + math.cos(math.pi * s / steps))) * 0.9 + 0.1)
    buffer: list[int] = []
    model.train()
    t0 = time.time()
    for step in range(steps):
        while len(buffer) < batch_size * (seq_len + 1):
            buffer += tok.encode(pretraining_document(world, rng), bos=True, eos=True)
        rows = torch.tensor(buffer[:batch_size * (seq_len + 1)]).view(batch_size, seq_len + 1)
        buffer = buffer[batch_size * (seq_len + 1):]
        logits = model(rows[:, :-1])  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0 or step == 0:
            log(f"pretraining step {step + 1}/{steps}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    model.eval()


def save_model(model: Transformer, directory: Path, tokenizer_bytes: bytes) -> None:
    """The Hugging Face layout: config.json, model.safetensors ("model." keys), tokenizer.model."""
    a = model.args
    directory.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.dim,
              "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads,
              "intermediate_size": a.hidden_dim, "vocab_size": a.vocab_size, "rms_norm_eps": a.norm_eps,
              "rope_theta": a.rope_theta, "max_position_embeddings": a.max_seq_len, "hidden_act": "silu",
              "tie_word_embeddings": a.tie_embeddings, "bos_token_id": 1, "eos_token_id": 2,
              "torch_dtype": "float32"}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {(k if k.startswith("lm_head") else "model." + k): v.contiguous()
             for k, v in model.state_dict().items()}
    save_safetensors(state, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "tokenizer.model").write_bytes(tokenizer_bytes)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0, help="seed of the world, the text, the tokenizer and the model")
    p.add_argument("--out", default=str(HERE), help="folder to write tiny-llama/ and world/ into")
    p.add_argument("--steps", type=int, default=3000, help="pretraining steps")
    p.add_argument("--batch-size", type=int, default=16, help="rows per pretraining step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row")
    p.add_argument("--lr", type=float, default=3e-3, help="peak pretraining learning rate")
    p.add_argument("--dim", type=int, default=128, help="hidden size of the tiny LLaMA")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--vocab", type=int, default=768, help="tokenizer vocabulary size")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the result is reproducible for a given count)")
    p.add_argument("--world-only", action="store_true",
                   help="write world/, world-val/ and world12-val/ alone: the facts and the tasks (the tokenizer "
                        "and model depend on the facts, not on how the tasks split the creatures)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start, out = time.time(), Path(args.out)

    world = make_world(args.seed)
    for folder, tasks in (("world", make_tasks(world, args.seed)),
                          ("world-val", make_validation_tasks(world, args.seed)),
                          ("world12-val", make_twelve_tasks(world, args.seed))):
        for task, splits in tasks.items():
            (out / folder / task).mkdir(parents=True, exist_ok=True)
            for split, records in splits.items():
                (out / folder / task / f"{split}.json").write_text(json.dumps(records, indent=1) + "\n")
    (out / "world" / "facts.json").write_text(json.dumps(world, indent=1) + "\n")
    if args.world_only:
        print(f"wrote {out / 'world'}, {out / 'world-val'} and {out / 'world12-val'} in {time.time() - start:.0f} s")
        return

    # The tokenizer learns its pieces from the pretraining text, as LLaMA's did: words that only the
    # fine-tuning prompts use are spelled with pieces whose embeddings pretraining has trained.
    tokenizer_bytes = train_tokenizer(pretraining_text(world, args.seed, 4000), args.vocab)
    tok_path = out / "tiny-llama" / "tokenizer.model"
    tok_path.parent.mkdir(parents=True, exist_ok=True)
    tok_path.write_bytes(tokenizer_bytes)
    tok = data.Tokenizer(tok_path)

    model_args = ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=4, n_kv_heads=2, hidden_dim=args.dim * 8 // 3,
                           vocab_size=tok.vocab_size, max_seq_len=512)
    model = Transformer(model_args)
    for name, param in model.named_parameters():  # GPT-2-style init: small normal weights, unit norms
        if param.dim() > 1:
            std = 0.02 / math.sqrt(2 * args.layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            torch.nn.init.normal_(param, std=std)
    pretrain(model, tok, world, args.seed, args.steps, args.batch_size, args.seq_len, args.lr)
    save_model(model, out / "tiny-llama", tokenizer_bytes)
    print(f"wrote {out / 'tiny-llama'} and {out / 'world'} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
