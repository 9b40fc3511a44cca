"""study/harness.py's bookkeeping: the plan, the learning-rate pick, the noise rule, the matched rank,
the 90% step, resuming from records and the report (the runs themselves are train.py's, tested in
test_train.py and test_assets.py). One test runs a sweep run and its retest for real, two steps each."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[1] / "study"


@pytest.fixture(scope="module")
def harness():
    sys.path.insert(0, str(STUDY))
    spec = importlib.util.spec_from_file_location("harness", STUDY / "harness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["harness"] = module  # report.py imports it by name
    spec.loader.exec_module(module)
    return module


def test_matched_lora_rank_is_the_closest(harness):
    target = harness.trainable_parameters(["--experts", "2"])
    rank = harness.matched_lora_rank(target)
    gaps = {r: abs(harness.trainable_parameters(["--lora", "--rank", str(r)]) - target)
            for r in (rank - 1, rank, rank + 1)}
    assert gaps[rank] == min(gaps.values())
    assert gaps[rank] < target * 0.05
    # Two rank-8 experts hold the parameters of one rank-16 LoRA, plus the router: a bit more than rank 16.
    assert rank >= 16


def test_within_noise(harness):
    assert harness.within_noise([0.50, 0.60, 0.55], [0.52, 0.58, 0.56])
    assert not harness.within_noise([0.50, 0.51, 0.52], [0.90, 0.91, 0.92])
    # A large gap with a large spread is still noise under the two-sigma rule.
    assert harness.within_noise([0.4, 0.9, 0.6], [0.9, 0.92, 0.91])


def test_pick_lr_by_mean_validation_smaller_on_ties(harness):
    assert harness.pick_lr({"1e-3": [0.5, 0.7], "2e-3": [0.9, 0.2], "5e-3": [0.6, 0.61]}) == "5e-3"
    assert harness.pick_lr({"5e-3": [0.6, 0.6], "1e-3": [0.7, 0.5]}) == "1e-3"  # equal means: the smaller rate


def test_steps_to_ninety_percent_of_final(harness):
    assert harness.steps_to_fraction([[24, 0.30], [48, 0.79], [72, 0.85], [120, 0.88]]) == 72  # 0.79 < 0.9 x 0.88
    assert harness.steps_to_fraction([[24, 0.30], [48, 0.80], [120, 0.88]]) == 48               # 0.80 >= 0.792
    assert harness.steps_to_fraction([[24, 0.9], [120, 0.6]]) == 24   # above 90% of a lower final: counts
    assert harness.steps_to_fraction([[120, 0.5]]) == 120


def test_the_plan_meets_the_protocol(harness):
    s = harness.Settings({"A": ["--lora"], "B": ["--experts", "2"]}, alpha_methods=("B",))
    runs = harness.plan(s)
    assert len(harness.LRS) >= 6 and float(harness.LRS[-1]) / float(harness.LRS[0]) >= 40
    assert len(harness.SWEEP_SEEDS) >= 2 and len(harness.FINAL_SEEDS) >= 5
    for m in "AB":
        sweep = [r for r in runs if r.method == m and r.stage == "sweep"]
        assert sorted((r.lr, r.seed) for r in sweep) == sorted((lr, s) for lr in harness.LRS
                                                               for s in harness.SWEEP_SEEDS)
        final = [r for r in runs if r.method == m and r.stage in ("final", "retest")]
        assert sorted(r.seed for r in final) == list(harness.FINAL_SEEDS) and all(r.lr is None for r in final)
    alpha = [(r.alpha_factor, r.seed) for r in runs if r.stage == "alpha"]
    assert {r.method for r in runs if r.stage == "alpha"} == {"B"}
    assert sorted(alpha) == [(f, seed) for f in harness.ALPHA_FACTORS for seed in (2, 3)]  # not the sweep's seeds
    assert len({(r.method, r.name) for r in runs}) == len(runs)  # every run has its own record


def fake_record(harness, tmp_path, run, val, test=None, train_loss=None):
    path = harness.Study(tmp_path, SETTINGS(harness)).record_path(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    tasks = {"t1": val, "t2": val}
    s = harness.Study(tmp_path, SETTINGS(harness))
    path.write_text(json.dumps({
        "method": run.method, "stage": run.stage, "seed": run.seed, "lr": run.lr, "alpha_factor": run.alpha_factor,
        "flags": s.flags(run), "val": tasks, "test": {"t1": test, "t2": test} if test is not None else None,
        "base": {"val": None, "test": None},
        "baselines": {"val": {t: {"chance": 0.5, "majority": 0.6} for t in tasks},
                      "test": {t: {"chance": 0.5, "majority": 0.55} for t in tasks} if test is not None else {}},
        "val_curve": [[20, val / 2], [60, val]] if run.stage == "final" else [], "diagnostics": {},
        "trainable": 1000, "train_loss": train_loss, "wall_seconds": 10.0, "cpu_seconds": 9.0, "peak_rss_mib": 1.0}))


def SETTINGS(harness):
    return harness.Settings({"A": ["--lora"]}, lrs=("1e-3", "5e-3"), sweep_seeds=(0,), final_seeds=(0, 1),
                            alpha_factors=(4.0,), alpha_methods=("A",), eval_every=20,
                            train_flags=["--max-steps", "60"])


def test_resume_runs_only_what_has_no_record_and_picks_from_validation(harness, tmp_path):
    s = harness.Study(tmp_path, SETTINGS(harness))
    runs = harness.plan(SETTINGS(harness))
    assert all(s.resolve(r) is None for r in runs if r.lr is None)  # no sweep yet: no pick
    fake_record(harness, tmp_path, harness.Run("A", "sweep", 0, "1e-3"), 0.6)
    assert s.resolve(harness.Run("A", "final", 1, None)) is None       # half a sweep: still no pick
    fake_record(harness, tmp_path, harness.Run("A", "sweep", 0, "5e-3"), 0.8)
    final = s.resolve(harness.Run("A", "final", 1, None))
    assert final.lr == "5e-3" and final.name == "final-lr5e-3-seed1"
    assert s.flags(final)[-2:] == ["--eval-every", "20"] and "--skip-test-eval" not in s.flags(final)
    assert "--skip-test-eval" in s.flags(harness.Run("A", "sweep", 0, "1e-3"))  # the sweep never sees the test
    assert s.flags(s.resolve(harness.Run("A", "alpha", 1, None, 4.0)))[-3:-1] == ["--alpha", "64"]  # 16 x 4

    executed = []
    s.execute = lambda run: (executed.append(run.name), fake_record(harness, tmp_path, run, 0.7, 0.65))
    s.run_all(runs, jobs=2, on_record=lambda: None)
    assert sorted(executed) == ["alpha-lr5e-3-alpha4x-seed1", "final-lr5e-3-seed1", "retest-lr5e-3-seed0"]
    executed.clear()
    s.run_all(runs, jobs=2, on_record=lambda: None)  # everything recorded: nothing runs again
    assert executed == [] and s.estimate(runs, 2) == 0

    # A record whose flags differ from what this study would run is refused, not mixed in.
    changed = harness.Settings({"A": ["--lora", "--rank", "4"]}, **{k: v for k, v in vars(SETTINGS(harness)).items()
                                                                    if k != "methods"})
    with pytest.raises(SystemExit, match="was made with other flags"):
        harness.Study(tmp_path, changed).check_records(harness.plan(changed))


def test_a_retest_reads_the_evaluation_that_eval_only_writes(harness, tmp_path):
    """A sweep run, then its retest (the sweep's saved adapters on the test, train.py --eval-only, which
    writes eval-<data>.json beside the run), for real: 2 steps, 4 questions per task."""
    settings = harness.Settings({"A": ["--lora", "--rank", "4"]}, lrs=("1e-3",), sweep_seeds=(0,), final_seeds=(0,),
                                alpha_methods=(), train_flags=["--max-steps", "2"], eval_flags=["--eval-limit", "4"])
    s = harness.Study(tmp_path, settings, log=lambda msg: None)
    sweep = s.execute(harness.Run("A", "sweep", 0, "1e-3"))
    assert sweep["test"] is None and len(sweep["val"]) == 6  # the sweep never sees the test
    retest = s.resolve(harness.Run("A", "retest", 0, None))
    assert retest.name == "retest-lr1e-3-seed0" and "--eval-only" in s.flags(retest)
    record = s.execute(retest)
    assert set(record["test"]) == set(sweep["val"]) and record["val"] == sweep["val"]  # the same adapters
    assert s.record(retest) == record


def test_report_shows_the_pick_the_baselines_and_test_only_at_the_pick(harness, tmp_path):
    import report
    for lr, val in (("1e-3", 0.6), ("5e-3", 0.8)):
        fake_record(harness, tmp_path, harness.Run("A", "sweep", 0, lr), val, train_loss=float(lr) * 40)
    fake_record(harness, tmp_path, harness.Run("A", "retest", 0, "5e-3"), 0.8, 0.75)
    fake_record(harness, tmp_path, harness.Run("A", "final", 1, "1e-3"), 0.9, 0.99)  # not at the pick: never shown
    assert report.write(tmp_path, SETTINGS(harness))["methods"]["A"]["alpha"] == {}  # no new run at the pick yet
    fake_record(harness, tmp_path, harness.Run("A", "final", 1, "5e-3"), 0.7, 0.65, train_loss=0.1)
    m = report.write(tmp_path, SETTINGS(harness))["methods"]["A"]
    assert m["train_loss"] == [0.2, 0.1]  # the retest's adapters were trained by the sweep run at 5e-3
    assert m["picked_lr"] == "5e-3" and m["pick_at_edge"] and m["test"] == [0.75, 0.65]
    assert m["steps_to_90"] == [60] and m["alpha"] == {1.0: [0.7]}  # x 1: the new final run's validation
    md = (tmp_path / "results.md").read_text()
    assert "| chance | | | 0.500 | 0.500 |" in md and "| majority | | | 0.600 | 0.550 |" in md
    assert "| A | 1,000 | 5e-3 (edge) | 0.800 | 0.700 ± 0.071 | 0.700 | 0.700 | 60 |" in md
    assert "| majority | 0.600 | 0.600 |" in md  # the sweep's table too shows the baselines (validation)
    assert "| A | 0.100 / 0.650, 0.200 / 0.750 |" in md  # training loss / test, lowest test first
    assert "0.99" not in md and (tmp_path / "lr.png").is_file()


def test_a_runs_training_loss_is_its_last_logged_interval(harness):
    log = [{"step": 40, "loss": 1.0}, {"step": 40, "val": {}}, {"step": 80, "loss": 0.5}, {"step": 80, "val": {}}]
    assert harness.last_loss(log) == 0.5 and harness.last_loss([]) is None


def test_the_figure_splits_methods_by_whether_their_layers_normalise(harness):
    # The figure's two panels follow the layers train.py would build, not the method's name.
    normalised = {m for m, flags in harness.methods().items() if harness.normalises(flags)}
    assert normalised == {"normalised LoRA (1 expert)", "OMoE-2 orthonormal", "normalised only, 2 experts",
                          "OMoE-4 soft", "OMoE-8 soft", "OMoE top-2 of 8"}
    assert not harness.normalises(["--lora"])  # plain LoRA
    assert harness.normalises(["--lora", "--orth", "orthonormal"])  # Gram–Schmidt of one vector: normalised


def test_a_pick_at_the_edge_of_a_sweep_extends_it_one_step(harness, tmp_path):
    """Settings.extend: a pick at the smallest (or largest) rate swept adds the next rate of GRID; a pick
    inside adds nothing (NO_RUN), and the final runs wait for the extension."""
    assert harness.extension({"1e-3": [0.6], "2e-3": [0.5], "5e-3": [0.4]}) == "5e-4"
    assert harness.extension({"1e-3": [0.4], "2e-3": [0.5], "5e-3": [0.6]}) == "1e-2"
    assert harness.extension({"1e-3": [0.4], "2e-3": [0.7], "5e-3": [0.6]}) is None
    assert harness.extension({"5e-2": [0.9], "2e-2": [0.1]}) is None  # the end of the grid
    s = harness.Settings({"A": ["--lora"]}, lrs={"A": ("1e-3", "2e-3")}, sweep_seeds=(0,), final_seeds=(0, 1),
                         alpha_methods=(), extend=True, sweep_curves=True, eval_every=20)
    st, runs = harness.Study(tmp_path, s), harness.plan(s)
    extension = next(r for r in runs if r.stage == "sweep" and r.lr is None)
    fake = lambda run, val: fake_record_with(harness, st, run, val)  # noqa: E731
    fake(harness.Run("A", "sweep", 0, "1e-3"), 0.8)
    assert st.resolve(extension) is None  # the sweep is not done
    fake(harness.Run("A", "sweep", 0, "2e-3"), 0.6)
    assert st.resolve(extension).lr == "5e-4" and st.resolve(harness.Run("A", "final", 1, None)) is None
    assert st.flags(st.resolve(extension))[-2:] == ["--eval-every", "20"]  # curves on the sweep too
    fake(harness.Run("A", "sweep", 0, "5e-4"), 0.7)
    assert st.resolve(harness.Run("A", "final", 1, None)).lr == "1e-3"  # picked over all three rates
    assert st.resolve(extension).lr == "5e-4"


def fake_record_with(harness, st, run, val):
    path = st.record_path(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"method": run.method, "stage": run.stage, "seed": run.seed, "lr": run.lr,
                                "alpha_factor": 1.0, "flags": st.flags(run), "val": {"t": val}}))


def test_switch_flags_are_not_train_py_flags(harness):
    flags = ["--experts", "2", "--orth", "normalized", "--switch-at", "48", "--switch-to", "none"]
    assert harness.train_flags(flags) == ["--experts", "2", "--orth", "normalized"]
    assert harness.trainable_parameters(flags) == harness.trainable_parameters(["--experts", "2"])


def test_the_switch_keeps_each_experts_mean_output_length(tiny_model_dir):
    """study/switch_run.py, normalised -> plain: each expert's B is divided by its mean normalising
    denominator, so that the plain outputs are as long on average as the normalised ones were (1), and
    AdamW's moments of B follow."""
    import torch

    import omoe
    from model import Transformer
    sys.path.insert(0, str(STUDY))
    import switch_run
    torch.manual_seed(0)
    model = omoe.add_experts(Transformer.from_pretrained(tiny_model_dir), experts=2, rank=4, dropout=0.0,
                             orth="normalized")
    layers = [m for m in model.modules() if isinstance(m, omoe.OMoELinear)]
    with torch.no_grad():
        for m in layers:
            m.lora_B.normal_(std=5.0)  # outputs far above the ridge: the normalised ones are 1 long
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    for m in layers:
        optimizer.state[m.lora_B] = {"exp_avg": torch.ones_like(m.lora_B), "exp_avg_sq": torch.ones_like(m.lora_B)}
    tokens, mask = torch.randint(3, 300, (4, 12)), torch.ones(4, 12, dtype=torch.long)
    inputs = {}  # each layer's input before the switch (after it, earlier layers change later ones' inputs)
    def keep(m, args, out):  # returns None: the output is left as it is
        inputs.setdefault(m, args[0].reshape(-1, args[0].shape[-1]))
    hooks = [m.register_forward_hook(keep) for m in layers]
    lengths = switch_run.denominators(model, tokens, mask)
    switch_run.switch(model, optimizer, "none", tokens, mask)
    with torch.no_grad():
        for m in layers:
            assert m.orth == "none"
            h = torch.einsum("nd,erd->ner", inputs[m], m.lora_A)
            mean_length = omoe.expert_sq_lengths(h, m.lora_B, m.scaling).sqrt().mean(0)   # (E,)
            torch.testing.assert_close(mean_length, torch.ones(2), atol=2e-3, rtol=0)
            torch.testing.assert_close(optimizer.state[m.lora_B]["exp_avg_sq"][:, 0, 0], lengths[m] ** -2)
    for h in hooks:
        h.remove()


def test_the_labs_commands_are_the_studys(harness):
    """notebooks/LAB.md's team table: each team's two commands are its method's flags at the rate the length
    study picked for that length (study/length/results.json), so a class runs what the study measured."""
    import re
    root = STUDY.parent
    picks = json.loads((root / "study" / "length" / "results.json").read_text())["lengths"]
    rows = [line for line in (root / "notebooks" / "LAB.md").read_text().splitlines()
            if re.match(r"\| [A-F] \|", line) and line.count("|") == 5]  # part 2's: two commands a row
    assert len(rows) == 6
    for row in rows:
        _, team, method, one, three, _ = (cell.strip() for cell in row.split("|"))
        flags = harness.METHODS[method]
        lr = {e: picks[e][method]["picked_lr"] for e in ("1", "3")}
        run = "--seed 1 --log-every 40 --out runs/" + team  # each its own folder; the study's log steps
        command = f"`python train.py --data assets/world-val {' '.join(flags)}".replace("  ", " ")
        assert one == f"{command} --lr {lr['1']} {run}-1ep`"
        assert three == f"{command} --lr {lr['3']} --epochs 3 {run}-3ep`"


def test_the_labs_block2_commands_are_the_studys_runs(harness):
    """notebooks/LAB.md part 4: each team's command trains what the regime study's seed 1 trained at its
    method's 3-epoch pick on block 2 (the record the teacher notes quote), with only what does not change
    training left out: the study's evaluation, saving and logging flags, and the probe for a LoRA."""
    import re
    import shlex
    root = STUDY.parent
    regime = importlib.import_module("regime_design")
    folder = regime.out(regime.BLOCKS[1])
    methods = json.loads((folder / "results.json").read_text())["lengths"]["3"]["methods"]
    rows = [line for line in (root / "notebooks" / "LAB.md").read_text().splitlines()
            if re.match(r"\| [A-F] \|", line) and line.count("|") == 4]
    assert len(rows) == 6

    def pairs(flags):  # flag -> value (None for a switch), order aside
        out = {}
        for i, f in enumerate(flags):
            if f.startswith("--"):
                out[f] = flags[i + 1] if i + 1 < len(flags) and not flags[i + 1].startswith("--") else None
        return out

    for row in rows:
        _, team, method, command, _ = (cell.strip() for cell in row.split("|"))
        words = shlex.split(command.strip("`"))
        lora = "--lora" in regime.methods(regime.BLOCKS[1])[method]
        assert words[:2] == (["python", "train.py"] if lora else ["python", "study/regime_run.py"])
        pick = methods[method]["picked_lr"]
        record, = [r for r in map(json.loads, map(Path.read_text, folder.glob("3-epochs/runs/*/sweep-*-seed1.json")))
                   if r["method"] == method and r["lr"] == pick]
        trained = pairs(record["flags"])
        for flag in ("--save-every", "--log-every", "--skip-base-eval", "--skip-test-eval") + (
                ("--probe-every",) if lora else ()):
            trained.pop(flag)
        assert pairs(words[2:]) == {**trained, "--out": f"runs/{team}-block2"}
