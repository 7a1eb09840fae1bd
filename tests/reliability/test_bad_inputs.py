"""Bad input, one clear error each (issue 15): every case ends in one line `<kind> error: <message>` naming the key
or file, what was expected and the fix, with exit code 2 and no traceback; checks that can run early do, before
data preparation (the token cache stays empty, no checkpoint or record is written), and nothing that existed is
overwritten.

Three layers, cheapest first: settings and paths the command line names fail in `preflight` (in-process: it is
what the CLI runs before Hydra starts); data, device, rank and W&B problems raise a bad-input error type that
`main()` turns into the one line (in-process: the error, its message and `_bad_input_kind`); and the cases the
issue named are also run end to end through `python -m scaletrain.run` (slow)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from scaletrain import records, run
from scaletrain.config import load_config
from scaletrain.data import DataError, prepare_data

from ..conftest import NO_LOCAL, REPO, compose_cfg, tiny_overrides, tinystories_head

fault = pytest.mark.fault
EOT = "<|endoftext|>"


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, tinystories_dir) -> Path:
    """The first stories of the TinyStories sample: enough for a tiny run, quick to tokenize."""
    return tinystories_head(tmp_path_factory.mktemp("small_data"), tinystories_dir, 40_000, 20_000)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, small_data) -> Path:
    """A complete token cache of small_data (tokenizer + tokens), copied before a test damages it."""
    cache = tmp_path_factory.mktemp("small_cache")
    prepare_data(load_config(compose_cfg(tiny_overrides(small_data, cache))).data)
    return cache


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, small_data, small_cache) -> Path:
    """A run directory with a real checkpoint (2 steps of the tiny model)."""
    from scaletrain.trainer import train

    run_dir = tmp_path_factory.mktemp("finished_run")
    extra = {"train.max_steps": 2, "train.eval_every": 0, "train.ckpt_every": 0}
    train(compose_cfg(tiny_overrides(small_data, small_cache, **extra)), run_dir)
    return run_dir


def _digests(folder: Path) -> dict[str, str]:
    """Every file under `folder` by relative path -> content hash: equal before and after = nothing overwritten."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------ settings: preflight, before Hydra


def _copy_of(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


# each: (overrides, multirun, kind, expected text); `{tmp}` is this test's tmp_path
CONFIG_CASES = [
    pytest.param(
        ["optim.lrr=1"],
        False,
        "config",
        "optim.lrr: no such key (did you mean 'lr'?)",
        marks=fault("misspelled key `optim.lrr=1`", "exit 2 before Hydra starts: names the key and the nearest one"),
    ),
    pytest.param(
        ["modell=tiny"],
        False,
        "config",
        "modell: no such key (did you mean 'model'?)",
        marks=fault("misspelled group `modell=tiny`", "exit 2 before Hydra starts: names the group, nearest one"),
    ),
    pytest.param(
        ["model=baseline10m"],
        False,
        "config",
        "(did you mean 'baseline_10m'?); available:",
        marks=fault("misspelled option `model=baseline10m`", "exit 2: names the option, lists the available ones"),
    ),
    pytest.param(
        ["+optim.lrr=1"],
        False,
        "config",
        "optim.lrr: not a key of AdamWConfig (did you mean 'lr'?)",
        marks=fault("a key forced in with `+optim.lrr=1`", "exit 2: names the key and the nearest valid one"),
    ),
    pytest.param(
        ["model.d_model=abc"],
        False,
        "config",
        "model.d_model: Value 'abc' of type 'str' could not be converted to Integer",
        marks=fault("wrong type `model.d_model=abc`", "exit 2: names the key and the type expected"),
    ),
    pytest.param(
        ["logging.wandb.mode=onlin"],
        False,
        "config",
        "expected one of [offline, online, disabled] (did you mean 'online'?)",
        marks=fault("misspelled value `logging.wandb.mode=onlin`", "exit 2: lists the allowed values, nearest one"),
    ),
    pytest.param(
        ["optim.lr=nan"],
        False,
        "config",
        "optim.lr: must be a finite positive number, got nan",
        marks=fault("`optim.lr=nan`", "exit 2: names the key, finite positive expected"),
    ),
    pytest.param(
        ["optim.lr=-1e-3"],
        False,
        "config",
        "optim.lr: must be a finite positive number, got -0.001",
        marks=fault("negative `optim.lr=-1e-3`", "exit 2: names the key, finite positive expected"),
    ),
    pytest.param(
        ["optim.weight_decay=inf"],
        False,
        "config",
        "optim.weight_decay: must be a finite number >= 0, got inf",
        marks=fault("`optim.weight_decay=inf` (any non-finite float)", "exit 2: names the key, finite expected"),
    ),
    pytest.param(
        ["train.batch_size=-8"],
        False,
        "config",
        "train.batch_size: must be positive, got -8",
        marks=fault("negative `train.batch_size=-8`", "exit 2: names the key, positive expected"),
    ),
    pytest.param(
        ["train.max_steps=0"],
        False,
        "config",
        "train.max_steps: must be positive, got 0",
        marks=fault("`train.max_steps=0`", "exit 2: names the key, positive expected"),
    ),
    pytest.param(
        ["train.seed=-1"],
        False,
        "config",
        "train.seed: must be in [0, 4294967295] (numpy's seed range), got -1",
        marks=fault(
            "negative seed `train.seed=-1`", "exit 2 before Hydra starts: names the key and numpy's seed range"
        ),
    ),
    pytest.param(
        [f"train.seed={2**40}"],
        False,
        "config",
        "train.seed: must be in [0, 4294967295] (numpy's seed range), got 1099511627776",
        marks=fault("seed beyond numpy's range `train.seed=2**40`", "exit 2 before Hydra starts: names the key, range"),
    ),
    pytest.param(
        ["data.seq_len=0"],
        False,
        "config",
        "data.seq_len: must be positive, got 0",
        marks=fault("`data.seq_len=0`", "exit 2: names the key, positive expected"),
    ),
    pytest.param(
        ["data.tokenizer.vocab_size=100"],
        False,
        "config",
        "data.tokenizer.vocab_size: must be >= 260",
        marks=fault("`data.tokenizer.vocab_size=100`", "exit 2: names the key and the minimum (256 bytes + specials)"),
    ),
    pytest.param(
        ["model.d_model=128", "model.n_heads=3"],
        False,
        "config",
        "model.n_heads: d_model=128 must be divisible by n_heads=3; allowed n_heads: [1, 2, 4, 8, 16, 32, 64]",
        marks=fault("`model.n_heads=3` with d_model 128", "exit 2: names the key and lists the allowed values"),
    ),
    pytest.param(
        ["model.vocab_size=300"],
        False,
        "config",
        "model.vocab_size: 300 cannot hold the BPE's 512 token ids (data.tokenizer); use null",
        marks=fault("`model.vocab_size=300` below the tokenizer's 512", "exit 2 before data preparation: names both"),
    ),
    pytest.param(
        ["moe=top2_8e", "moe.top_k=9"],
        False,
        "config",
        "moe.top_k: must be in [1, n_experts=8], got 9",
        marks=fault("`moe.top_k=9` with 8 experts", "exit 2: names the key and the allowed range"),
    ),
    pytest.param(
        ["cluster=slurm", "cluster.gpus_per_node=8", "train.batch_size=12"],
        False,
        "config",
        "train.batch_size: 12 (global) must be divisible by the 8 ranks",
        marks=fault("`train.batch_size=12` on 8 ranks", "exit 2 before submitting: names both keys and the ranks"),
    ),
    pytest.param(
        ["train.device=tpu"],
        False,
        "config",
        "train.device: expected auto | cpu | cuda | cuda:N | mps, got 'tpu'",
        marks=fault("`train.device=tpu`", "exit 2: lists the devices accepted"),
    ),
    pytest.param(
        ["train.resume="],
        False,
        "config",
        "train.resume: empty; expected a non-empty string (none | auto | PATH), got ''",
        marks=fault("empty `train.resume=`", "exit 2: says what train.resume accepts"),
    ),
    pytest.param(
        ["optim.lr=1e-3,nan"],
        True,
        "config",
        "optim.lr: must be a finite positive number, got nan",
        marks=fault("one bad point in a sweep `-m optim.lr=1e-3,nan`", "exit 2 before any job starts: names the key"),
    ),
    pytest.param(
        ["hydra.run.dir={tmp}/a_file/run"],
        False,
        "config",
        "hydra.run.dir={tmp}/a_file/run: {tmp}/a_file is a file, not a folder; set hydra.run.dir to a folder",
        marks=fault("output folder under a file `hydra.run.dir=file/run`", "exit 2 before Hydra starts: names key"),
    ),
    pytest.param(
        ["hydra.run.dir=/sys/scaletrain-run"],
        False,
        "config",
        "hydra.run.dir=/sys/scaletrain-run: cannot create folders under /sys",
        marks=[
            fault("unwritable output folder `hydra.run.dir=/sys/run`", "exit 2 before Hydra starts: names key, why"),
            pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs Linux's read-only /sys"),
        ],
    ),
    pytest.param(
        ["hydra.run.dir={tmp}/" + "x" * 300],
        False,
        "config",
        "hydra.run.dir={tmp}/" + "x" * 300 + ": the path has a name of 300 bytes, more than this system's limit of",
        marks=fault(
            "a 300-character folder name `hydra.run.dir=x...x`", "exit 2 before Hydra starts: the path, the limit"
        ),
    ),
    pytest.param(
        ["data.path={tmp}/my", "data"],
        False,
        "config",
        "'data' is not key=value: if it is the rest of data.path's value, the shell split the value at a space; "
        "quote it (data.path='{tmp}/my data') or escape the space (data.path={tmp}/my\\ data)",
        marks=fault(
            "unquoted path with a space `data.path=/my data`", "exit 2: names the word split off, how to quote"
        ),
    ),
    pytest.param(
        ["hydra.sweep.dir={tmp}/a_file/sweep", "optim.lr=1e-3,2e-3"],
        True,
        "config",
        "hydra.sweep.dir={tmp}/a_file/sweep: {tmp}/a_file is a file, not a folder",
        marks=fault("sweep folder under a file `-m hydra.sweep.dir=file/x`", "exit 2 before any job: names the key"),
    ),
    pytest.param(
        ["train.resume={tmp}/missing.pt"],
        False,
        "config",
        "train.resume='{tmp}/missing.pt': no checkpoint found; expected a step_*.pt file",
        marks=fault("`train.resume=/missing.pt`", "exit 2 before Hydra starts: names the path and what is accepted"),
    ),
    pytest.param(
        ["train.resume={tmp}/empty_folder"],
        False,
        "config",
        "train.resume='{tmp}/empty_folder': no checkpoint found",
        marks=fault("`train.resume=` a folder without checkpoints", "exit 2 before Hydra starts: names the path"),
    ),
    pytest.param(
        ["train.resume={tmp}/notes.txt"],
        False,
        "checkpoint",
        "{tmp}/notes.txt: not a readable checkpoint",
        marks=fault("`train.resume=` a file that is not a checkpoint", "exit 2 before Hydra starts: names the file"),
    ),
]


@pytest.mark.parametrize("overrides,multirun,kind,expected", CONFIG_CASES)
def test_a_bad_setting_or_path_fails_in_one_line_before_hydra_starts(
    overrides, multirun, kind, expected, tmp_path, capsys
):
    (tmp_path / "a_file").write_text("a file where a folder is expected\n")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "empty_folder").mkdir()
    args = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    if not any(a.startswith("hydra.") for a in args):
        args.append(f"hydra.{'sweep' if multirun else 'run'}.dir={tmp_path}/out")
    with pytest.raises(SystemExit) as exit_:
        run.preflight(["debug=cpu_tiny", NO_LOCAL, *args], multirun=multirun)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.startswith(f"{kind} error: ") and err.count(" error: ") == 1, err
    assert expected.replace("{tmp}", str(tmp_path)) in err
    assert not (tmp_path / "out").exists()  # Hydra never started: no run folder, no logs


@pytest.fixture
def sigint_handler_kept():
    """cli() ignores further Ctrl-Cs once it stops for one: give the test process its own handler back."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


@fault("Ctrl-C while the command line is checked (start-up)", "exit 130, one line: interrupted, nothing written")
def test_ctrl_c_during_start_up_ends_in_one_line_and_exit_130(monkeypatch, capsys, sigint_handler_kept):
    def ctrl_c(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "preflight", ctrl_c)
    monkeypatch.setattr(run, "_run_dir", None)
    monkeypatch.setattr(sys, "argv", ["scaletrain-run", "debug=cpu_tiny"])
    with pytest.raises(SystemExit) as exit_:
        run.cli()
    assert exit_.value.code == 130
    assert capsys.readouterr().err == f"{run.STARTING_UP}\n"
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # a third Ctrl-C cannot break the line


@fault(
    "a second Ctrl-C while the first one's checkpoint is saved",
    "exit 130, one line: the run folder, its status and step, the last checkpoint; no traceback",
)
def test_a_second_ctrl_c_ends_in_one_line_naming_the_state_of_the_run(
    tmp_path, monkeypatch, capsys, sigint_handler_kept
):
    run_dir = tmp_path / "run"
    (run_dir / records.CKPT_DIR).mkdir(parents=True)
    (run_dir / records.CKPT_DIR / records.checkpoint_name(5, sharded=False)).write_bytes(b"a checkpoint")
    second = KeyboardInterrupt("second Ctrl-C: stopping without a checkpoint")  # distributed.Preemption raises it
    records.write_status(run_dir, records.RunState.interrupted, 7, second)  # as the trainer records it

    def training(*args: object, **kwargs: object) -> None:
        monkeypatch.setattr(run, "_run_dir", run_dir)  # main() records its run folder first
        raise second

    monkeypatch.setattr(run, "preflight", lambda *args, **kwargs: None)
    monkeypatch.setattr(run, "main", training)
    monkeypatch.setattr(sys, "argv", ["scaletrain-run", "debug=cpu_tiny"])
    with pytest.raises(SystemExit) as exit_:
        run.cli()
    assert exit_.value.code == 130
    assert capsys.readouterr().err == (
        f"interrupted (second Ctrl-C: stopping without a checkpoint): run folder {run_dir}, status interrupted at "
        "step 7; last checkpoint step_0000005.pt (train.resume=auto continues from it)\n"
    )


@fault(
    "Ctrl-C while worker processes prepare data (their pool raises its own TimeoutError from it)",
    "treated as the Ctrl-C it is: exit 130, one line (seen behind the pool's error)",
)
def test_a_ctrl_c_behind_a_worker_pools_error_is_still_a_ctrl_c():
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise TimeoutError from None  # what multiprocess's pool raises when its wait is interrupted
    except TimeoutError as err:
        assert isinstance(run._interrupt_behind(err), KeyboardInterrupt)  # main() raises it: cli's one line
    assert run._interrupt_behind(ValueError("a bug")) is None


# python -m scaletrain.run, with a Ctrl-C (a real SIGINT) raised exactly when run.py starts importing Hydra
CTRL_C_WHILE_IMPORTING = """
import runpy, signal, sys

class CtrlCOnImport:
    def find_spec(self, name, path=None, target=None):
        if name == "hydra":
            sys.meta_path.remove(self)
            signal.raise_signal(signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlCOnImport())
sys.argv = ["scaletrain.run", "debug=cpu_tiny"]
runpy.run_module("scaletrain.run", run_name="__main__", alter_sys=True)
"""


@fault("Ctrl-C while `python -m scaletrain.run` imports its modules", "exit 130, one line, no traceback")
def test_ctrl_c_while_the_command_imports_its_modules_ends_in_one_line():
    res = subprocess.run(
        [sys.executable, "-c", CTRL_C_WHILE_IMPORTING], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 130, res.stderr[-3000:]
    assert res.stderr == "interrupted (Ctrl-C) while starting up: no run was started, nothing was written\n"  # exactly


@fault("`--cfg job train.resume=/missing.pt`", "prints the config: only a command that runs checks paths")
def test_cfg_job_prints_a_config_with_a_missing_resume_path_without_checking_it(tmp_path):
    """`--cfg job` shows what a run would use; only a command that runs checks the filesystem."""
    run.preflight(["debug=cpu_tiny", NO_LOCAL, f"train.resume={tmp_path}/missing.pt"], multirun=False, will_run=False)


@pytest.mark.parametrize(
    "change,listed",
    [
        pytest.param(
            {"model.d_model": 64},
            "model.d_model: 64 (checkpoint: 128)",
            marks=fault("resume with another model `model.d_model=64`", "exit 2 before Hydra starts: lists each key"),
        ),
        pytest.param(
            {"data.tokenizer.vocab_size": 600},
            "data.tokenizer.vocab_size: 600 (checkpoint: 512)",
            marks=fault("resume with another vocabulary", "exit 2 before Hydra starts: lists each key, both values"),
        ),
    ],
)
def test_resuming_a_checkpoint_this_config_cannot_continue_fails_before_hydra_starts(
    change, listed, finished_run, small_data, tmp_path, capsys
):
    before = _digests(finished_run)
    extra = {"train.resume": finished_run, "hydra.run.dir": tmp_path / "out", **change}
    with pytest.raises(SystemExit) as exit_:
        run.preflight(tiny_overrides(small_data, tmp_path / "cache", **extra), multirun=False)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.startswith(f"checkpoint error: cannot resume from {finished_run}/checkpoints/step_0000002.pt")
    assert listed in err
    assert _digests(finished_run) == before and not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------- data: DataError naming the file


def _txt(folder: Path, train: str | bytes | None, valid: str | bytes | None = "A valid story." + EOT) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in (("train.txt", train), ("valid.txt", valid)):
        if content is not None:
            data = content if isinstance(content, bytes) else content.encode()
            (folder / name).write_bytes(data)


def _parquet(folder: Path, column: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train", "valid"):
        pq.write_table(pa.table({column: ["Once upon a time there was a cat."] * 20}), folder / f"{name}.parquet")


def _bad_data(case: str, root: Path, small: Path) -> tuple[Path, dict[str, object]]:
    """Build the bad input of `case` under `root`: (data.path, extra overrides)."""
    d, story = root / "data", (small / "train.txt").read_text()
    extra: dict[str, object] = {}
    if case == "missing_folder":
        return root / "nope", extra
    if case == "no_train":
        _txt(d, None)
    elif case == "no_valid":
        _txt(d, story, None)
    elif case == "empty_valid":
        _txt(d, story, "")
    elif case == "whitespace":
        _txt(d, f"  \n\t\n{EOT}\n  {EOT}\n")
    elif case == "latin1_valid":
        _txt(d, story, "A story about a caf\xe9.\n".encode("latin-1"))
    elif case == "one_huge_document":  # no separator: the whole file is one document
        _txt(d, story.replace(EOT, ""))
        extra["data.tokenizer.max_train_bytes"] = 10_000
    elif case == "corrupt_jsonl":
        d.mkdir(parents=True)
        (d / "train.jsonl").write_text('{"text": "a story"}\n{"text": "unterminated\n')
        (d / "valid.jsonl").write_text('{"text": "a story"}\n')
    elif case == "missing_column":
        _parquet(d, "story")
    elif case == "short_valid":
        _txt(d, story, "Too short." + EOT)
    elif case == "gpt2_missing":
        _txt(d, story)
        extra.update({"data.tokenizer.kind": "gpt2", "data.tokenizer.gpt2_dir": root / "no_gpt2"})
    elif case == "gpt2_broken":
        _txt(d, story)
        (root / "gpt2").mkdir()
        (root / "gpt2" / "vocab.json").write_text('{"a": 0,')
        (root / "gpt2" / "merges.txt").write_text("#version: 0.2\n")
        extra.update({"data.tokenizer.kind": "gpt2", "data.tokenizer.gpt2_dir": root / "gpt2"})
    elif case == "cache_dir_is_a_file":
        (root / "cache_file").write_text("")
        extra["data.cache_dir"] = root / "cache_file"
        return small, extra
    return d, extra


DATA_CASES = [
    pytest.param(
        "missing_folder",
        "data.path={root}/nope: folder {root}/nope not found; expected a folder with the train and validation files",
        marks=fault("`data.path=` a folder that does not exist", "DataError: names data.path and the files expected"),
    ),
    pytest.param(
        "no_train",
        "{root}/data: no train file; expected exactly one of train.txt, train.jsonl, train.parquet",
        marks=fault("data folder without train.txt", "DataError: names the folder and the file names accepted"),
    ),
    pytest.param(
        "no_valid",
        "{root}/data: no val file; expected exactly one of validation.txt",
        marks=fault("data folder without valid.txt", "DataError: names the folder and the file names accepted"),
    ),
    pytest.param(
        "empty_valid",
        "{root}/data/valid.txt: the file is empty; expected text",
        marks=fault("empty valid.txt", "DataError before reading any text: names the file"),
    ),
    pytest.param(
        "whitespace",
        "{root}/data/train.txt: no documents, only whitespace and <|endoftext|> separators",
        marks=fault("train.txt of whitespace and separators only", "DataError: names the file, text expected"),
    ),
    pytest.param(
        "latin1_valid",
        "{root}/data/valid.txt: line 1 is not UTF-8 (byte 0xe9 at column 20); expected UTF-8 text: convert",
        marks=fault("non-UTF-8 (Latin-1) valid.txt", "DataError: names the file, line and byte; says how to convert"),
    ),
    pytest.param(
        "one_huge_document",
        "train split of {root}/data (train.txt, valid.txt): its first document has",
        marks=fault(
            "train.txt without `<|endoftext|>`, larger than data.tokenizer.max_train_bytes",
            "DataError: the tokenizer would get no text; names the key and the separator",
        ),
    ),
    pytest.param(
        "corrupt_jsonl",
        "{root}/data/train.jsonl: cannot be read as JSON Lines (one JSON object per line) (ArrowInvalid: JSON parse",
        marks=fault("corrupt train.jsonl", "DataError: names the file and the format expected"),
    ),
    pytest.param(
        "missing_column",
        "{root}/data/train.parquet has no column 'text' (data.sources.tinystories.text_column); its columns: ['story']",
        marks=fault(
            "parquet without the `text` column", "DataError: names data.sources.<name>.text_column, the columns there"
        ),
    ),
    pytest.param(
        "short_valid",
        "fewer than data.seq_len + 1 = 65 ({root}/data (train.txt, valid.txt))",
        marks=fault("valid.txt shorter than one window", "DataError: names data.seq_len and the token count"),
    ),
    pytest.param(
        "gpt2_missing",
        "GPT-2 tokenizer file not found: {root}/no_gpt2/vocab.json (data.tokenizer.gpt2_dir must hold",
        marks=fault("`data.tokenizer.gpt2_dir=` a missing folder", "DataError: names the file and the key"),
    ),
    pytest.param(
        "gpt2_broken",
        "GPT-2 tokenizer files in {root}/gpt2 cannot be read",
        marks=fault("broken GPT-2 vocab.json", "DataError: names the folder and the files expected"),
    ),
    pytest.param(
        "cache_dir_is_a_file",
        "data.cache_dir={root}/cache_file: {root}/cache_file is a file, not a folder",
        marks=fault("`data.cache_dir=` a file", "DataError before reading any text: names the key"),
    ),
]


@pytest.mark.parametrize("case,expected", DATA_CASES)
def test_bad_data_fails_with_a_data_error_naming_the_file_and_builds_nothing(
    case, expected, tmp_path, small_data, monkeypatch
):
    data_path, extra = _bad_data(case, tmp_path, small_data)
    cache = tmp_path / "cache"
    extra = {"data.cache_dir": cache, **extra}
    cfg = load_config(compose_cfg(tiny_overrides(data_path, cache, **extra)))
    with pytest.raises(DataError) as err:
        prepare_data(cfg.data)
    assert run._bad_input_kind(err.value) == "data"  # main() prints it as one line "data error: ..."
    assert expected.replace("{root}", str(tmp_path)) in str(err.value)
    # no token cache entry, except where only the tokens can tell (a split shorter than a window: the entry is
    # sound, and a run with a shorter data.seq_len reuses it)
    assert bool(list(cache.glob("tokens/*"))) == (case == "short_valid")


@pytest.mark.parametrize(
    "damage,expected",
    [
        pytest.param(
            "truncate_train_bin",
            "is damaged: train.bin is 100 bytes, expected",
            marks=fault("truncated token cache (train.bin)", "DataError: names the cache folder, says to delete it"),
        ),
        pytest.param(
            "delete_val_bin",
            "is damaged: val.bin is missing",
            marks=fault("token cache without val.bin", "DataError: names the cache folder, says to delete it"),
        ),
        pytest.param(
            "corrupt_meta",
            "is damaged: meta.json cannot be read (JSONDecodeError",
            marks=fault("corrupt token cache meta.json", "DataError: names the cache folder, says to delete it"),
        ),
        pytest.param(
            "corrupt_tokenizer",
            "cached tokenizer cannot be read",
            marks=fault("corrupt cached tokenizer.json", "DataError: names the file, says to delete its folder"),
        ),
    ],
)
def test_a_damaged_cache_is_reported_by_path_and_left_as_it_was(damage, expected, tmp_path, small_data, small_cache):
    cache = _copy_of(small_cache, tmp_path / "cache")
    [entry] = cache.glob("tokens/*")
    [tokenizer] = cache.glob("tokenizers/*/tokenizer.json")
    if damage == "truncate_train_bin":
        (entry / "train.bin").write_bytes((entry / "train.bin").read_bytes()[:100])
    elif damage == "delete_val_bin":
        (entry / "val.bin").unlink()
    elif damage == "corrupt_meta":
        (entry / "meta.json").write_text('{"version": "1", "train": {')
    elif damage == "corrupt_tokenizer":
        tokenizer.write_text("{not a tokenizer")
    before = _digests(cache)
    with pytest.raises(DataError) as err:
        prepare_data(load_config(compose_cfg(tiny_overrides(small_data, cache))).data)
    assert run._bad_input_kind(err.value) == "data"
    assert expected in str(err.value)
    assert str(tokenizer if damage == "corrupt_tokenizer" else entry) in str(err.value)
    assert "delete" in str(err.value)
    assert _digests(cache) == before  # reported, not rebuilt over


# ----------------------------------------------------------- the job's machine: check_job, before any data


def _clear_launcher_env(monkeypatch) -> None:
    for key in ("TORCHELASTIC_RUN_ID", "SUBMITIT_EXECUTOR", "SLURM_STEP_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)


def _check_job_error(overrides: list[str], tmp_path: Path) -> Exception:
    cfg = load_config(compose_cfg(overrides))
    with pytest.raises(Exception) as err:
        run.check_job(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # nothing prepared or written
    return err.value


@pytest.mark.parametrize(
    "device",
    [
        pytest.param(
            "mps",
            marks=fault("`train.device=mps` without an Apple GPU", "exit 2 before data preparation: names the key"),
        ),
        pytest.param(
            "cuda",
            marks=fault("`train.device=cuda` on a CPU-only machine", "exit 2 before data preparation: names the key"),
        ),
    ],
)
def test_a_device_this_machine_lacks_fails_before_data_preparation(device, tmp_path, small_data, monkeypatch):
    import torch

    _clear_launcher_env(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine, even on a GPU host
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    err = _check_job_error(tiny_overrides(small_data, tmp_path / "cache", **{"train.device": device}), tmp_path)
    assert run._bad_input_kind(err) == "device"
    assert str(err).startswith(f"train.device={device}: ") and "use train.device=auto" in str(err)


@fault("`train.batch_size=8` under torchrun with 3 ranks", "exit 2 before data preparation: names key and ranks")
def test_a_batch_the_ranks_cannot_share_evenly_fails_before_data_preparation(tmp_path, small_data, monkeypatch):
    _clear_launcher_env(monkeypatch)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    err = _check_job_error(tiny_overrides(small_data, tmp_path / "cache"), tmp_path)
    assert run._bad_input_kind(err) == "config"
    assert str(err).startswith("train.batch_size: 8 (global) must be divisible by the 3 ranks")


@fault("`logging.wandb.mode=online`, W&B server unreachable", "exit 2 before data preparation: names the key, URL")
def test_online_wandb_with_an_unreachable_server_fails_before_data_preparation(tmp_path, small_data, monkeypatch):
    _clear_launcher_env(monkeypatch)
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: refused at once
    import wandb

    try:
        err = _check_job_error(
            tiny_overrides(small_data, tmp_path / "cache", **{"logging.wandb.mode": "online"}), tmp_path
        )
    finally:
        wandb.teardown()  # wandb.login kept this key and URL in its process-wide settings
    assert run._bad_input_kind(err) == "wandb"
    assert "logging.wandb.mode=online: cannot reach the W&B server at http://127.0.0.1:9" in str(err)
    assert "logging.wandb.mode=offline" in str(err)


# ------------------------------------------------------------------- end to end: python -m scaletrain.run


def run_cli(overrides: list[str], env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """`python -m scaletrain.run` as a user runs it; `env` adds variables (None removes one)."""
    full = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "scaletrain.run", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in full.items() if v is not None},
    )


def assert_one_line_error(res: subprocess.CompletedProcess, kind: str, *names: str) -> None:
    """Exit 2, no traceback, one `<kind> error:` line, and the names in the message."""
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [i for i, line in enumerate(res.stderr.splitlines()) if " error: " in line]
    assert len(errors) == 1, res.stderr[-3000:]
    message = "\n".join(res.stderr.splitlines()[errors[0] :])
    assert message.startswith(f"{kind} error: ")
    for name in names:
        assert name in message, message


def _bad_file(case: str, folder: Path, small: Path) -> Path:
    if case == "empty":
        _txt(folder, "")
    elif case == "latin1":
        _txt(folder, "A story about a caf\xe9.\n".encode("latin-1"))
    elif case == "corrupt_parquet":
        _txt(folder, None, (small / "valid.txt").read_text())
        (folder / "train.parquet").write_bytes(b"PAR1 this is not a parquet file")
    return next(folder.glob("train.*"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "case,expected",
    [
        pytest.param(
            "empty",
            "the file is empty; expected text",
            marks=fault("empty train.txt", "exit 2, one line: names the file, before reading any text"),
        ),
        pytest.param(
            "latin1",
            "line 1 is not UTF-8 (byte 0xe9 at column 20)",
            marks=fault("non-UTF-8 train.txt", "exit 2, one line: names the file, line and byte, how to convert"),
        ),
        pytest.param(
            "corrupt_parquet",
            "cannot be read as Parquet (ArrowInvalid: Parquet magic bytes not found",
            marks=fault("corrupt train.parquet", "exit 2, one line: names the file and the format expected"),
        ),
    ],
)
def test_the_cli_names_a_bad_train_file_in_one_line(case, expected, tmp_path, small_data):
    bad = _bad_file(case, tmp_path / "data", small_data)
    overrides = tiny_overrides(tmp_path / "data", tmp_path / "cache", **{"hydra.run.dir": tmp_path / "run"})
    res = run_cli(overrides)
    assert_one_line_error(res, "data", f"{bad}: ", expected)
    said = [line for line in res.stderr.splitlines() if "error" in line.lower()]
    assert len(said) == 1, res.stderr  # the readers' own error logs are quiet (datasets logged parquet's too)
    assert not list((tmp_path / "cache").glob("tokens/*"))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@fault("`train.resume=/missing.pt` (CLI)", "exit 2 in ~3 s, before Hydra starts: names the path and what is accepted")
def test_the_cli_rejects_a_missing_resume_path_before_hydra_starts(tmp_path, small_data):
    extra = {"train.resume": "/missing.pt", "hydra.run.dir": tmp_path / "run"}
    res = run_cli(tiny_overrides(small_data, tmp_path / "cache", **extra))
    assert_one_line_error(res, "config", "train.resume='/missing.pt': no checkpoint found", "'auto' / 'none'")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
@fault("`train.device=cuda` on a CPU-only machine (CLI)", "exit 2 before data preparation: names the key and fix")
def test_the_cli_rejects_a_missing_device_before_data_preparation(tmp_path, small_data):
    extra = {"train.device": "cuda", "hydra.run.dir": tmp_path / "run"}
    res = run_cli(tiny_overrides(small_data, tmp_path / "cache", **extra), env={"CUDA_VISIBLE_DEVICES": ""})
    assert_one_line_error(res, "device", "train.device=cuda: CUDA is not available", "train.device=cpu")
    assert not (tmp_path / "cache").exists()  # no tokenizer, no token cache
    assert not (tmp_path / "run" / "run_info.json").exists() and not (tmp_path / "run" / "status.json").exists()


@pytest.mark.slow
@fault("resume whose model differs (CLI, `model.d_model=64`)", "exit 2 before Hydra starts: lists each key")
def test_the_cli_lists_what_blocks_a_resume_without_a_traceback(tmp_path, small_data, finished_run):
    before = _digests(finished_run)
    extra = {"train.resume": finished_run, "model.d_model": 64, "hydra.run.dir": tmp_path / "run"}
    res = run_cli(tiny_overrides(small_data, tmp_path / "cache", **extra))
    assert_one_line_error(res, "checkpoint", "cannot resume from", "model.d_model: 64 (checkpoint: 128)")
    assert _digests(finished_run) == before and not (tmp_path / "run").exists()


@pytest.mark.slow
@fault("`logging.wandb.mode=online` without an API key (CLI)", "exit 2 before data preparation: says how to log in")
def test_the_cli_rejects_online_wandb_without_a_key_before_data_preparation(tmp_path, small_data):
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "WANDB_API_KEY": None, "NETRC": str(home / ".netrc"), "WANDB_CONFIG_DIR": str(home)}
    extra = {"logging.wandb.mode": "online", "hydra.run.dir": tmp_path / "run"}
    res = run_cli(tiny_overrides(small_data, tmp_path / "cache", **extra), env=env)
    assert_one_line_error(res, "wandb", "logging.wandb.mode=online: No API key configured", "WANDB_API_KEY")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "status.json").exists()


@pytest.mark.slow
@fault("output folder under a file (CLI, `hydra.run.dir=file/run`)", "exit 2 in ~1 s: one line instead of Hydra's")
def test_the_cli_rejects_an_output_folder_it_cannot_create_in_one_line(tmp_path, small_data):
    (tmp_path / "a_file").write_text("")
    res = run_cli(tiny_overrides(small_data, tmp_path / "cache", **{"hydra.run.dir": tmp_path / "a_file" / "run"}))
    assert_one_line_error(res, "config", f"hydra.run.dir={tmp_path}/a_file/run: {tmp_path}/a_file is a file")
    assert (tmp_path / "a_file").read_text() == "" and not (tmp_path / "cache").exists()
