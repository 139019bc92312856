"""Zoo format: round trip, checksum and format checks, safe loading, CLI list/show."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from autol2o import DMOptimizer, RNNprop
from autol2o.cli import app, main
from autol2o.errors import UserError
from autol2o.zoo import (
    CARD_FILE,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    ZooError,
    list_entries,
    load_entry,
    load_rule,
    save_entry,
    update_card,
)

CARD = {
    "description": "test entry",
    "tasks": [{"name": "quadratic", "dim": 5}],
    "horizon": 100, "unroll": 20, "meta_iterations": 3,
    "evaluation": {"headline": "0.5x Adam"},
    "command": "autol2o zoo train --rule rnnprop --task quadratic",
}


def _rule(cls=RNNprop, seed=0):
    torch.manual_seed(seed)
    rule = cls()
    with torch.no_grad():  # move away from the init so a wrong load cannot pass by chance
        for p in rule.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return rule


def _run(rule, grads):
    state = rule.init_state(grads.shape[1])
    with torch.no_grad():
        return torch.stack([rule(g, state)[0] for g in grads])


@pytest.fixture
def entry(tmp_path) -> Path:
    return save_entry(_rule(), tmp_path / "zoo" / "rn", CARD)


@pytest.mark.parametrize("cls", [RNNprop, DMOptimizer])
def test_round_trip_gives_identical_updates(tmp_path, cls):
    rule = _rule(cls, seed=3)
    out = save_entry(rule, tmp_path / "e", CARD)
    loaded, card = load_entry(out)
    assert type(loaded) is cls and loaded.config() == rule.config()
    grads = torch.randn(6, 50) * torch.logspace(-4, 2, 50)
    assert torch.equal(_run(rule, grads), _run(loaded, grads))
    # automatic card fields
    assert card["format_version"] == FORMAT_VERSION
    assert card["name"] == "e" and card["rule"] == cls.name
    assert card["rule_config"] == rule.config()
    assert card["n_meta_params"] == sum(p.numel() for p in rule.parameters())
    assert card["sha256"] == hashlib.sha256((out / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert card["command"] == CARD["command"] and card["tasks"] == CARD["tasks"]


def test_same_weights_give_the_same_bytes_and_checksum(tmp_path):
    """safetensors writes its metadata in hash order; the zoo sorts the header so that a
    retrained entry with identical weights matches its card's sha256 (and cached results)."""
    import struct

    torch.manual_seed(0)
    rule = RNNprop()
    blobs = []
    for i in range(6):
        save_entry(rule, tmp_path / str(i), {"name": "x"})
        blobs.append((tmp_path / str(i) / "weights.safetensors").read_bytes())
    assert all(b == blobs[0] for b in blobs)
    n = struct.unpack("<Q", blobs[0][:8])[0]
    header = blobs[0][8:8 + n].rstrip(b" ")
    assert header == json.dumps(json.loads(header), sort_keys=True, separators=(",", ":")).encode()
    loaded, _ = load_entry(tmp_path / "0")
    for k, v in rule.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_flipped_byte_is_rejected_naming_the_file(entry):
    w = entry / WEIGHTS_FILE
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(ZooError) as exc:
        load_rule(entry)
    msg = str(exc.value)
    assert str(w) in msg and "sha256" in msg and "\n" not in msg
    assert isinstance(exc.value, UserError)


def test_wrong_checksum_in_card(entry):
    card = json.loads((entry / CARD_FILE).read_text())
    card["sha256"] = "0" * 64
    (entry / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ZooError, match="sha256 mismatch"):
        load_entry(entry)


@pytest.mark.parametrize("victim, problem", [(CARD_FILE, "card missing"),
                                             (WEIGHTS_FILE, "weights file missing")])
def test_missing_files(entry, victim, problem):
    (entry / victim).unlink()
    with pytest.raises(ZooError) as exc:
        load_entry(entry)
    assert str(entry / victim) in str(exc.value) and problem in str(exc.value)


@pytest.mark.parametrize("text, problem", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({"format_version": 99, "rule_config": {}, "sha256": ""}),
     "unknown format_version 99"),
    (json.dumps({"format_version": FORMAT_VERSION, "sha256": "00"}), "'rule_config'"),
    (json.dumps({"format_version": FORMAT_VERSION, "rule_config": {"rule": "sgd"},
                 "sha256": "00"}), "unknown rule 'sgd'"),
])
def test_bad_cards(entry, text, problem):
    (entry / CARD_FILE).write_text(text)
    with pytest.raises(ZooError) as exc:
        load_entry(entry)
    assert str(entry / CARD_FILE) in str(exc.value) and problem in str(exc.value)


def test_weights_of_another_rule_are_rejected(tmp_path):
    """Valid file, valid checksum, but the tensors do not fit the card's rule."""
    dm = save_entry(_rule(DMOptimizer), tmp_path / "dm", CARD)
    rn = save_entry(_rule(RNNprop), tmp_path / "rn", CARD)
    card = json.loads((rn / CARD_FILE).read_text())
    card["sha256"] = json.loads((dm / CARD_FILE).read_text())["sha256"]
    (rn / CARD_FILE).write_text(json.dumps(card))
    (rn / WEIGHTS_FILE).write_bytes((dm / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ZooError, match="do not fit rule_config"):
        load_entry(rn)


class _Payload:
    """Unpickling this object would create a file: proof that code ran."""

    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (Path(self.sentinel),))


def test_loading_never_executes_code(entry, tmp_path):
    """A pickle smuggled in as the weights (with a matching checksum) is refused, not run."""
    sentinel = tmp_path / "pwned"
    data = pickle.dumps({"input.weight": _Payload(str(sentinel))})
    (entry / WEIGHTS_FILE).write_bytes(data)
    card = json.loads((entry / CARD_FILE).read_text())
    card["sha256"] = hashlib.sha256(data).hexdigest()
    (entry / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ZooError, match="not a valid safetensors file"):
        load_entry(entry)
    assert not sentinel.exists()
    pickle.loads(data)  # the payload is live: unpickling it *would* have run it
    assert sentinel.exists()


def test_save_refuses_to_overwrite(entry):
    with pytest.raises(ZooError, match="already exists"):
        save_entry(_rule(), entry, CARD)
    save_entry(_rule(seed=1), entry, CARD, overwrite=True)
    load_entry(entry)


def test_update_card_keeps_checksum_valid(entry):
    update_card(entry, {"evaluation": {"headline": "0.7x best Adam"}})
    _, card = load_entry(entry)
    assert card["evaluation"]["headline"] == "0.7x best Adam"
    with pytest.raises(ZooError, match="sha256"):
        update_card(entry, {"sha256": "0" * 64})


def test_names_resolve_against_root_and_env(entry, monkeypatch):
    root = entry.parent
    save_entry(_rule(DMOptimizer), root / "dm", CARD)
    assert [e.name for e in list_entries(root)] == ["dm", "rn"]
    assert isinstance(load_rule("dm", root=root), DMOptimizer)
    monkeypatch.setenv("AUTOL2O_ZOO", str(root))
    assert isinstance(load_rule("rn"), RNNprop)
    with pytest.raises(ZooError, match=r"no zoo entry 'nope'.*available.*dm, rn"):
        load_rule("nope")


def test_a_broken_entry_is_listed_as_unusable_and_blocks_nothing(entry, monkeypatch):
    """A save interrupted after the weights leaves a folder without a card: listed with its
    error, skipped by name lookup of the others and by ``zoo list``'s table, never fatal."""
    root = entry.parent
    (root / "half").mkdir()
    (root / "half" / WEIGHTS_FILE).write_bytes((entry / WEIGHTS_FILE).read_bytes())
    entries = {e.name: e for e in list_entries(root)}
    assert set(entries) == {"half", "rn"} and entries["rn"].error is None
    assert "card.json" in entries["half"].error and entries["half"].card == {}
    assert isinstance(load_rule("rn", root=root), RNNprop)
    with pytest.raises(ZooError, match=r"no zoo entry 'nope'.*available.*half, rn"):
        load_rule("nope", root=root)
    monkeypatch.setenv("AUTOL2O_ZOO", str(root))
    res = CliRunner().invoke(app, ["zoo", "list", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert rows["half"]["error"] and rows["rn"]["error"] is None
    res = CliRunner().invoke(app, ["zoo", "list"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "unusable" in res.output
    from autol2o.fit import FitConfig, check_zoo

    check_zoo(FitConfig())  # a usable entry is left: fit can race


def test_learned_optimizer_accepts_a_zoo_name(entry, monkeypatch):
    from autol2o import LearnedOptimizer

    monkeypatch.setenv("AUTOL2O_ZOO", str(entry.parent))
    w = torch.nn.Parameter(torch.ones(3))
    opt = LearnedOptimizer([w], "rn")
    (w * w).sum().backward()
    opt.step()
    assert not torch.equal(w.detach(), torch.ones(3))


# -- CLI ---------------------------------------------------------------------------------------
runner = CliRunner()


def test_cli_list_table_and_json(entry, monkeypatch):
    save_entry(_rule(DMOptimizer), entry.parent / "dm", {**CARD, "evaluation": {},
                                                         "race": False})
    monkeypatch.setenv("AUTOL2O_ZOO", str(entry.parent))
    res = runner.invoke(app, ["zoo", "list"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if " rn " in ln or " dm " in ln]
    assert len(lines) == 2
    rn_line = next(ln for ln in lines if " rn " in ln)
    for cell in ("rnnprop", "quadratic", "100", "0.5x Adam", "6641 params", " yes "):
        assert cell in rn_line
    dm_line = next(ln for ln in lines if " dm " in ln)
    assert "not evaluated" in dm_line and " no " in dm_line
    assert 'the card says "race": false' in res.output
    # an 80-column terminal: a block per entry, every field whole (the table would fold the
    # name and the headline into strips)
    res = runner.invoke(app, ["zoo", "list"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    out = res.output.splitlines()
    i = out.index(next(ln for ln in out if ln.startswith("rn ")))
    assert out[i] == "rn  rnnprop, horizon 100, 3 meta-iterations, 6641 params, " \
        f"{(entry / WEIGHTS_FILE).stat().st_size / 1024:.1f} KiB"
    assert out[i + 1] == "  trained on: quadratic" and "0.5x Adam" in out[i + 2]
    dm_line = next(ln for ln in out if ln.startswith("dm "))
    assert dm_line.endswith("KiB, not raced by fit (--race-all)") and "not evaluated" in res.output

    res = runner.invoke(app, ["zoo", "list", "--json"])
    rows = json.loads(res.stdout)
    assert [r["name"] for r in rows] == ["dm", "rn"]
    rn = rows[1]
    assert rn["rule"] == "rnnprop" and rn["trained_on"] == ["quadratic"]
    assert rn["horizon"] == 100 and rn["meta_iterations"] == 3
    assert rn["size_bytes"] == (entry / WEIGHTS_FILE).stat().st_size
    assert rn["headline"] == "0.5x Adam"
    assert rn["race"] is True and rows[0]["race"] is False


def test_a_card_whose_race_field_is_not_a_bool_is_refused(entry):
    card = json.loads((entry / CARD_FILE).read_text())
    (entry / CARD_FILE).write_text(json.dumps({**card, "race": "no"}))
    with pytest.raises(ZooError, match=r"card.json: card field 'race' must be true or false, "
                                       r"got 'no'"):
        load_rule(entry)


def test_cli_show_json_and_root_option(entry):
    res = runner.invoke(app, ["zoo", "show", "rn", "--root", str(entry.parent), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == json.loads((entry / CARD_FILE).read_text())
    res = runner.invoke(app, ["zoo", "show", str(entry)])
    assert res.exit_code == 0 and "sha256 verified" in res.stdout and "rnnprop" in res.stdout


def test_cli_lists_the_name_lookup_accepts(entry, capsys):
    """A renamed entry directory: list/show use the directory name (what --optimizer and
    `zoo show` accept); show mentions the card's own name."""
    renamed = entry.rename(entry.parent / "myopt")
    root = str(renamed.parent)
    rows = json.loads(runner.invoke(app, ["zoo", "list", "--json", "--root", root]).stdout)
    assert [r["name"] for r in rows] == ["myopt"]
    assert isinstance(load_rule("myopt", root=root), RNNprop)
    res = runner.invoke(app, ["zoo", "show", "myopt", "--root", root], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "card name: rn (look it up as myopt)" in res.stdout


def test_cli_bare_zoo_shows_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["zoo"])
    assert exc.value.code == 0
    out, err = capsys.readouterr()
    assert "Usage" in out and "list" in out and err == ""
    with pytest.raises(SystemExit) as exc:
        main(["zoo", "list", "--bogus"])
    assert exc.value.code == 2 and "No such option: --bogus" in capsys.readouterr().err


def test_cli_reports_tampering_in_one_line(entry, capsys):
    (entry / WEIGHTS_FILE).write_bytes(b"garbage")
    with pytest.raises(SystemExit) as exc:
        main(["zoo", "show", str(entry)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(entry / WEIGHTS_FILE) in err and "\n" not in err


TRAIN_NO_HORIZON = ["zoo", "train", "--rule", "rnnprop", "--task", "quadratic", "--unroll", "2",
                    "--iterations", "2", "--batch", "1", "--device", "cpu"]
TRAIN = [*TRAIN_NO_HORIZON, "--horizon", "4"]


def _train_error(capsys, args: list[str]) -> str:
    """Run ``autol2o zoo train`` expecting a usage error: exit 2, one line, returned."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def test_cli_train_refuses_to_overwrite(entry, capsys):
    """An entry is replaced only with --overwrite; --resume needs a checkpoint (it used to
    retrain from scratch over a finished entry), and an interrupted run's checkpoint is kept."""
    sha = json.loads((entry / CARD_FILE).read_text())["sha256"]
    err = _train_error(capsys, [*TRAIN, "--out", str(entry)])
    assert err.endswith("zoo entry already exists (use --overwrite to replace it)")
    err = _train_error(capsys, [*TRAIN, "--resume", "--out", str(entry)])
    assert err == f"error: {entry / 'checkpoint'}: no checkpoint to resume"
    assert json.loads((entry / CARD_FILE).read_text())["sha256"] == sha
    assert not (entry / "checkpoint").exists()
    fresh = entry.parent / "fresh"
    assert "no checkpoint to resume" in _train_error(capsys, [*TRAIN, "--resume", "--out",
                                                             str(fresh)])
    assert not fresh.exists()
    # a checkpoint next to the entry (killed while writing it): --resume finishes that run
    (entry / "checkpoint").mkdir()
    (entry / "checkpoint" / "checkpoint.pt").write_bytes(b"")
    err = _train_error(capsys, [*TRAIN, "--out", str(entry)])
    assert "or --resume to finish its checkpointed run" in err
    (entry / CARD_FILE).unlink()
    (entry / WEIGHTS_FILE).unlink()
    err = _train_error(capsys, [*TRAIN, "--out", str(entry)])
    assert "an interrupted run's checkpoint is here (use --resume" in err
    # --overwrite starts over: the stale checkpoint goes, the new entry is written
    assert main([*TRAIN, "--overwrite", "--out", str(entry)]) is None
    load_entry(entry)
    assert not (entry / "checkpoint").exists()


@pytest.mark.parametrize("extra, message", [
    (["--iterations", "0"], "--iterations must be >= 1, got 0"),
    (["--unroll", "50", "--horizon", "10"], "--unroll 50 must be <= the horizon (10)"),
    (["--curriculum", "0:10:999"], "--curriculum must be 'ITER:HORIZON,...'"),
    (["--curriculum", "0:10,0:20"], "--curriculum: two stages start at iteration 0"),
    (["--curriculum", "0:10,100:20", "--iterations", "4"],
     "--curriculum: stage 100:20 starts at or after --iterations 4, so it never runs"),
    (["--curriculum", "5:10"], "--curriculum must start at iteration 0"),
    (["--curriculum", "0:10", "--horizon", "20"], "--horizon 20 conflicts with --curriculum"),
    (["--validate-every", "-1"], "--validate-every must be >= 0, got -1"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0, got -1"),
    (["--meta-lr", "-1"], "--meta-lr must be a finite number > 0, got -1.0"),
    (["--meta-lr", "nan"], "--meta-lr must be a finite number > 0, got nan"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--rule", "dm", "--magnitude"], "--magnitude is an option of --rule rnnprop, not dm"),
])
def test_cli_train_rejects_bad_options_before_creating_anything(tmp_path, capsys, extra, message):
    out = tmp_path / "e"
    args = TRAIN_NO_HORIZON if "--curriculum" in extra else TRAIN
    assert message in _train_error(capsys, [*args, *extra, "--out", str(out)])
    assert not out.exists()


def test_cli_train_device_and_out_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _train_error(capsys, [*TRAIN, "--device", "cuda", "--out", str(tmp_path / "e")])
    assert err == "error: --device cuda: CUDA is not available"
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    err = _train_error(capsys, [*TRAIN, "--out", str(afile)])
    assert err == f"error: {afile}: exists and is a file"
    err = _train_error(capsys, [*TRAIN, "--out", str(afile / "x")])
    assert err == f"error: {afile / 'x'}: {afile} is a file"
    assert afile.read_text() == "keep me"


def test_cli_train_help_names_real_tasks():
    from autol2o.meta import preset_spec

    res = runner.invoke(app, ["zoo", "train", "--help"], env={"COLUMNS": "300"})
    assert "mnist-nn-sigmoid" in res.output and "mnist-mlp-sigmoid" not in res.output
    preset_spec("mnist-nn-sigmoid")  # the name the help gives exists


def test_cli_train_writes_a_loadable_entry(tmp_path):
    """`zoo train` end to end on a tiny task: entry loads, card records how to reproduce it."""
    out = tmp_path / "zoo" / "tiny"
    args = ["zoo", "train", "--rule", "dm", "--task", "quadratic", "--unroll", "3",
            "--iterations", "4", "--batch", "2", "--curriculum", "4,6",
            "--horizon", "4",  # the curriculum's first horizon: accepted (older cards have it)
            "--ema", "0.5", "--device", "cpu", "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exception is None and res.exit_code == 0, res.output
    rule, card = load_entry(out)
    assert isinstance(rule, DMOptimizer) and not (out / "checkpoint").exists()
    training = card["training"]
    assert training["meta_iterations"] == 4 and training["curriculum"] == [[0, 4], [2, 6]]
    assert card["tricks"]["random_scaling"] == 0 and training["meta_loss"] == "mean"
    assert training["ema"] == 0.5
    assert card["command"] == (
        f"autol2o zoo train --rule dm --task quadratic --curriculum 0:4,2:6 --unroll 3 "
        f"--iterations 4 --batch 2 --meta-lr 0.001 --lr-schedule constant --warmup 0 --ema 0.5 "
        f"--no-random-scaling --no-convex --validate-every 0 --val-runs 8 --seed 0 --out {out}")
    rows = json.loads(runner.invoke(app, ["zoo", "list", "--json", "--root", str(out.parent)])
                      .stdout)
    assert rows[0]["horizon"] == 6 and rows[0]["trained_on"] == ["quadratic"]


def test_cli_train_magnitude_builds_the_log_rms_rule(tmp_path):
    """`--magnitude`: the entry holds RNNprop with three inputs, its card says so and the
    card's command repeats the flag, so that it reproduces the entry."""
    out = tmp_path / "mag"
    res = runner.invoke(app, [*TRAIN, "--magnitude", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rule, card = load_entry(out)
    assert rule.magnitude and rule.input.in_features == 3
    assert card["rule_config"]["magnitude"] is True
    assert " --magnitude " in card["command"]


def test_cli_train_init_continues_from_an_entry(entry, tmp_path):
    """`--init` starts from the entry's weights (one step at a meta-lr far below float32
    resolution: identical updates) and the card
    names the entry it started from; a rule mismatch or a tampered entry is a one-line error."""
    out = tmp_path / "warm"
    base = ["zoo", "train", "--task", "quadratic", "--horizon", "4", "--unroll", "2",
            "--batch", "1", "--device", "cpu", "--init", str(entry)]
    res = runner.invoke(app, [*base, "--rule", "rnnprop", "--iterations", "1", "--meta-lr",
                              "1e-30", "--out", str(out)])
    assert res.exit_code == 0, res.output
    grads = torch.randn(5, 7)
    torch.testing.assert_close(_run(load_rule(out), grads), _run(load_rule(entry), grads),
                               rtol=0, atol=0)
    card = json.loads((out / CARD_FILE).read_text())
    assert card["init_from"]["sha256"] == json.loads((entry / CARD_FILE).read_text())["sha256"]
    assert f"--init {entry}" in card["command"]

    # a run that started from --init must be resumed from the same entry
    (out / CARD_FILE).unlink()
    (out / WEIGHTS_FILE).unlink()
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "checkpoint.pt").write_bytes(b"")
    (out / "checkpoint" / "init.json").write_text(json.dumps(card["init_from"]))
    res = runner.invoke(app, [*base[:-2], "--rule", "rnnprop", "--resume", "--out", str(out)])
    assert res.exit_code != 0 and "resume it with the same --init" in str(res.exception)

    res = runner.invoke(app, [*base, "--rule", "dm", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "holds a 'rnnprop' rule, not 'dm'" in str(res.exception)
    res = runner.invoke(app, [*base, "--magnitude", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "the entry's rule has no magnitude=True" in str(res.exception)
    blob = bytearray((entry / WEIGHTS_FILE).read_bytes())
    blob[-1] ^= 1
    (entry / WEIGHTS_FILE).write_bytes(bytes(blob))
    res = runner.invoke(app, [*base, "--rule", "rnnprop", "--out", str(tmp_path / "y")])
    assert res.exit_code != 0 and str(entry / WEIGHTS_FILE) in str(res.exception)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_atomic_write_syncs_before_rename_and_a_failed_write_keeps_the_old_file(tmp_path,
                                                                              monkeypatch):
    import os

    from autol2o import atomic

    target = tmp_path / "card.json"
    target.write_text("old")
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(atomic.os, "replace",
                        lambda a, b: (events.append("replace"), real_replace(a, b)))
    atomic.atomic_write_text(target, "new")
    assert target.read_text() == "new" and events == ["fsync", "replace"]
    assert [p.name for p in tmp_path.iterdir()] == ["card.json"]    # no temporary left behind

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        atomic.atomic_write_text(target, "newer")
    assert target.read_text() == "new"                              # the old file is whole
    assert [p.name for p in tmp_path.iterdir()] == ["card.json"]


def test_cli_list_verifies_every_checksum(entry, monkeypatch):
    """``zoo list`` vouches for what ``fit`` will load: a flipped byte shows as unusable (it
    used to read only the cards) and an entry whose card cannot be read is not shown as raced."""
    data = bytearray((entry / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0x01
    (entry / WEIGHTS_FILE).write_bytes(bytes(data))
    (entry.parent / "cardless").mkdir()
    (entry.parent / "cardless" / WEIGHTS_FILE).write_bytes(b"x")
    monkeypatch.setenv("AUTOL2O_ZOO", str(entry.parent))
    res = runner.invoke(app, ["zoo", "list", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert "sha256 mismatch" in rows["rn"]["error"] and str(entry / WEIGHTS_FILE) in rows["rn"][
        "error"]
    assert rows["cardless"]["error"] and rows["cardless"]["race"] is False


def test_cli_train_refuses_a_foreign_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = _train_error(capsys, [*TRAIN, "--out", str(out)])
    assert err == (f"error: {out}: exists, is not empty and holds no zoo entry (choose a new "
                   "--out, or --overwrite to write the entry into it)")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
