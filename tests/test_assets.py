"""The embedded default: the shipped tiny LLaMA loads, its tokenizer reads the shipped tasks exactly,
the world generator is deterministic, and a short default run learns something."""

import importlib.util
import json
from pathlib import Path

import torch

import data
import train
from model import Transformer

ASSETS = Path(__file__).resolve().parents[1] / "assets"
MODEL, WORLD, WORLD_VAL = ASSETS / "tiny-llama", ASSETS / "world", ASSETS / "world-val"


def load_build():
    spec = importlib.util.spec_from_file_location("build", ASSETS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checkpoint_loads_and_knows_its_world():
    """The shipped checkpoint loads like any HF LLaMA, and the base model answers the pretraining
    text's numbered quizzes about the held-out creatures: the knowledge fine-tuning must reach."""
    model = Transformer.from_pretrained(MODEL)
    config = json.loads((MODEL / "config.json").read_text())
    tok = data.Tokenizer(MODEL / "tokenizer.model")
    assert model.args.vocab_size == tok.vocab_size == config["vocab_size"]
    assert model.args.dim == config["hidden_size"] and model.args.n_kv_heads < model.args.n_heads  # GQA
    assert (MODEL / "model.safetensors").stat().st_size < 5 * 2**20  # a few MB at most
    build = load_build()
    facts = json.loads((WORLD / "facts.json").read_text())
    _, held_out = build.split_names(facts, 0)
    digits = [tok.sp.piece_to_id(str(k + 1)) for k in range(4)]
    for attr, values in build.ATTRIBUTES.items():
        quizzes = [tok.encode(f"Quiz: {build.QUESTIONS[attr].format(name)}\n"
                              + " ".join(f"Choice{k + 1}: {build.answer(attr, name, v)}" for k, v in enumerate(values))
                              + "\nSo the correct answer is choice") for name in held_out]
        lengths = torch.tensor([len(q) for q in quizzes])
        tokens = torch.tensor([q + [0] * (max(lengths) - len(q)) for q in quizzes])  # right padding: causal, harmless
        with torch.no_grad():
            logits = model(tokens)[torch.arange(len(quizzes)), lengths - 1][:, digits[:len(values)]]
        truth = torch.tensor([values.index(facts[name][attr]) for name in held_out])
        accuracy = (logits.argmax(-1) == truth).float().mean().item()
        assert accuracy >= 0.9, (attr, accuracy)


def test_tokenizer_round_trips_every_prompt():
    tok = data.Tokenizer(MODEL / "tokenizer.model")
    assert (tok.bos_id, tok.eos_id, tok.sp.unk_id(), tok.sp.pad_id()) == (1, 2, 0, -1)
    tasks = {split: data.load_tasks(WORLD, split) for split in ("train", "test")}
    tasks["val"] = data.load_tasks(WORLD_VAL, "val")
    assert set(tasks["train"]) == set(tasks["val"]) == set(tasks["test"]) == set(load_build().TASKS)
    for examples in (ex for split in tasks.values() for ex in split.values()):
        for ex in examples:
            text = data.prompt(ex) + ex.output
            ids = tok.encode(text)
            assert tok.decode(ids) == text
            assert tok.sp.unk_id() not in ids


def test_generator_is_deterministic_and_matches_the_shipped_files():
    build = load_build()
    world = build.make_world(0)
    assert world == build.make_world(0) != build.make_world(1)
    assert world == json.loads((WORLD / "facts.json").read_text())
    tasks = build.make_tasks(world, 0)
    assert tasks == build.make_tasks(build.make_world(0), 0)
    assert build.pretraining_text(world, 0, 50) == build.pretraining_text(world, 0, 50)
    train_names, test_names = build.split_names(world, 0)
    assert not set(train_names) & set(test_names)
    for task, splits in tasks.items():
        for split, records in splits.items():
            assert records == json.loads((WORLD / task / f"{split}.json").read_text()), (task, split)
        # Held-out questions name no fine-tuning creature.
        for r in splits["test"]:
            assert not any(n in r["instruction"] for n in train_names), r["instruction"]


def test_validation_folder_splits_the_fine_tuning_creatures():
    """assets/world-val: the same test, and 32 of the fine-tuning creatures moved from train to val, so that
    no wording of a validation creature is trained on; the generator writes exactly the shipped files."""
    build = load_build()
    world = build.make_world(0)
    fine_tuning, test_names = build.split_names(world, 0)
    train_names, val_names = build.split_validation(fine_tuning, 0)
    assert (len(train_names), len(val_names), len(test_names)) == (160, 32, 64)
    assert sorted(train_names + val_names) == fine_tuning  # a partition of the fine-tuning creatures
    tasks = build.make_validation_tasks(world, 0)
    assert tasks == build.make_validation_tasks(build.make_world(0), 0)
    for task, splits in tasks.items():
        assert set(splits) == {"train", "val", "test"}
        assert splits["test"] == build.make_tasks(world, 0)[task]["test"]
        for split, records in splits.items():
            assert records == json.loads((WORLD_VAL / task / f"{split}.json").read_text()), (task, split)
        for split, own in (("train", train_names), ("val", val_names), ("test", test_names)):
            others = set(world) - set(own)
            for r in splits[split]:
                assert any(n in r["instruction"] for n in own), r["instruction"]
                assert not any(n in r["instruction"] for n in others), (split, r["instruction"])


def test_twelve_task_folder_adds_six_maps_of_its_own():
    """assets/world12-val: world-val's split of the creatures, one question per creature and task, and
    six more tasks whose options leave no value where the six tasks (and pretraining) put it."""
    build = load_build()
    world = build.make_world(0)
    fine_tuning, test_names = build.split_names(world, 0)
    train_names, val_names = build.split_validation(fine_tuning, 0)
    tasks = build.make_twelve_tasks(world, 0)
    assert tuple(tasks) == build.TASKS12 and len(tasks) == 12
    for task, splits in tasks.items():
        for split, names in (("train", train_names), ("val", val_names), ("test", test_names)):
            assert splits[split] == json.loads((ASSETS / "world12-val" / task / f"{split}.json").read_text())
            asked = sorted(n for r in splits[split] for n in names if f" {n}" in r["instruction"])
            assert asked == sorted(names), (task, split)  # each creature once
    readme = (ASSETS / "README.md").read_text()
    for task, (attr, family, _) in build.MORE_TASKS.items():
        order = build.own_order(task, 0)
        row = next(line.strip() for line in readme.splitlines()
                   if line.strip().startswith(f"| `{task}` | {attr} | {family}1"))
        assert row.endswith(f": {', '.join(order)} |"), row  # the README's table is the built one
        assert sorted(order) == sorted(build.ATTRIBUTES[attr])
        assert all(a != b for a, b in zip(order, build.ATTRIBUTES[attr]))
        for r in tasks[task]["test"]:
            name = next(n for n in test_names if f" {n}" in r["instruction"])
            assert r["answer"] == f"{family}{order.index(world[name][attr]) + 1}"
            assert f"Answer format: {'/'.join(f'{family}{k + 1}' for k in range(len(order)))}" in r["instruction"]


def test_build_is_deterministic(tmp_path):
    """Two short builds with the same seed write the same bytes: tokenizer, weights, tasks."""
    build, threads = load_build(), torch.get_num_threads()
    try:
        for name in ("a", "b"):
            build.main(["--out", str(tmp_path / name), "--steps", "2", "--batch-size", "2", "--seq-len", "32"])
    finally:
        torch.set_num_threads(threads)  # the build pins one thread; the other tests use them all
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    # tiny-llama/*, facts.json, the tasks of world/ and world-val/, and world12-val/'s
    assert len(files) == 3 + 1 + 5 * len(build.TASKS) + 3 * len(build.TASKS12)
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "world" / "facts.json").read_bytes() == (WORLD / "facts.json").read_bytes()


def test_short_default_run_beats_the_base_model(tmp_path, capsys):
    """The embedded recipe, shortened (fewer steps, 48 test questions per task), still lifts
    held-out accuracy on average well above the base model's, and says what it did."""
    code = train.main(["--out", str(tmp_path), "--max-steps", "60", "--eval-limit", "48", "--log-every", "20"])
    assert code == 0
    printed = capsys.readouterr().out
    for expected in ("base model accuracy: ", "chance majority   before    after", "|cos| before   after",
                     f"adapters: {tmp_path / 'adapter'}   results: {tmp_path / 'results.json'}"):
        assert expected in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["model"] == str(MODEL)  # no --model: the embedded one
    mean = {k: sum(r["accuracy"] for r in results[k].values()) / len(results[k]) for k in ("before", "after")}
    assert mean["after"] > mean["before"] + 0.15, mean
