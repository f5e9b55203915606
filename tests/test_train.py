"""train.py: config loading, checkpoints, exact resume, DDP equivalence, the time budget in a run, errors."""
import argparse
import contextlib
import importlib.util
import json
import os
import math
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from conftest import ROOT, assert_one_line_error, run_in_process, run_script
import batches
import budget
import common
import gpt
import schedule
import train
from common import UserError
from tokenizer import load_tokenizer

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8",
        "--eval_iters=4", "--device=cpu", "--dtype=float32", "--learning_rate=3e-3",
        "--warmup_iters=5", "--lr_decay_iters=40", "--min_lr=3e-4"]


def train_run(data, out_dir, *args, check=True):
    """train.py with the tiny settings, run in this process (train.py as a process of its own is
    tested where the process matters: signals, exit status, torchrun)."""
    result = run_in_process(train.main, *TINY, f"--dataset={data}", f"--out_dir={out_dir}", *args)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def torchrun(data, out_dir, *args, script=ROOT / "train.py"):
    """train.py (or `script`) under torchrun with 2 gloo processes (the command line, for Popen or run)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(script), *TINY, f"--dataset={data}", f"--out_dir={out_dir}", *args]


CLOCKED_TRAIN = """
import os, sys, time
sys.path.insert(0, {root!r})
import common, train

now = [0.0]
time.time = lambda: now[0]


def moving(function, seconds):
    def call(*args, **kwargs):
        now[0] += seconds
        return function(*args, **kwargs)
    return call


train.train_step = moving(train.train_step, {step_s!r}[int(os.environ.get("RANK", "0"))])
train.evaluate = moving(train.evaluate, {eval_s!r})
common.run_main(train.main)
"""


def clocked_train(folder, step_s, eval_s=0.5):
    """A script that runs train.py's command line on a clock that only its steps and evaluations
    move: each step by step_s[rank] seconds, each evaluation by eval_s. A time budget then decides
    the same lengths however loaded the machine is."""
    script = folder / "clocked_train.py"
    script.write_text(CLOCKED_TRAIN.format(root=str(ROOT), step_s=list(step_s), eval_s=eval_s), encoding="utf-8")
    return script


def use_step_clock(monkeypatch, step_s, eval_s=0.5):
    """clocked_train's clock for train.py run in this process; its step_s may be changed."""
    clock, step, evaluate = types.SimpleNamespace(now=0.0, step_s=step_s), train.train_step, train.evaluate

    def timed_step(*args, **kwargs):
        clock.now += clock.step_s
        return step(*args, **kwargs)

    def timed_evaluate(*args, **kwargs):
        clock.now += eval_s
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(time, "time", lambda: clock.now)
    monkeypatch.setattr(train, "train_step", timed_step)
    monkeypatch.setattr(train, "evaluate", timed_evaluate)
    return clock


def wait_for_logged_losses(proc, out_dir, count, timeout=120):
    """Wait until a run started with Popen has logged `count` losses to its metrics.jsonl."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (out_dir / "metrics.jsonl").exists() and len(losses(out_dir)) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run logged fewer than {count} losses: {proc.communicate()}")


def metrics(out_dir):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def losses(out_dir):
    return {r["iter"]: r["loss"] for r in metrics(out_dir) if "loss" in r}


# --- config -------------------------------------------------------------------------------------

def test_config_file_then_command_line_override_defaults(tmp_path):
    config_file = tmp_path / "c.py"
    config_file.write_text("n_layer = 3\nlearning_rate = 1\nout_dir = 'from-file'\nimport math\n")
    cfg = train.load_config([str(config_file), "--out_dir=cli", "--max_iters", "7", "--bias=False"])
    assert cfg["n_layer"] == 3
    assert cfg["learning_rate"] == 1.0 and type(cfg["learning_rate"]) is float  # int accepted for float
    assert cfg["out_dir"] == "cli" and cfg["max_iters"] == 7 and cfg["bias"] is False
    assert cfg["n_head"] == train.DEFAULTS["n_head"]


def test_a_bare_flag_switches_a_bool_setting_on(tmp_path):
    """A bare `--flag` sets a bool setting to True, wherever it stands."""
    config_file = tmp_path / "c.py"
    config_file.write_text("n_layer = 3\n")
    cfg = train.load_config(["--compile", "--bias", "false", "--decay_lr", str(config_file),
                             "--max_iters", "7"])
    assert cfg["compile"] is True and cfg["bias"] is False and cfg["decay_lr"] is True
    assert cfg["n_layer"] == 3 and cfg["max_iters"] == 7
    assert train.load_config(["--tensorboard_log"])["tensorboard_log"] is True  # last argument


@pytest.mark.parametrize("argv", [["c.py", "--help"], ["--max_iters=3", "-h"]])
def test_help_anywhere_prints_the_settings(monkeypatch, capsys, argv):
    """--help (or -h) anywhere among the arguments prints the settings."""
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    train.main()
    assert "--max_iters=5000" in capsys.readouterr().out


def test_help_explains_every_setting_with_its_default(monkeypatch, capsys):
    """--help shows every setting with its default (which parses back to it) and what it means."""
    monkeypatch.setattr(sys, "argv", ["train.py", "--help"])
    train.main()
    lines = [line.strip() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("--")]
    shown = {line[2:].partition("=")[0]: line for line in lines}
    assert list(shown) == list(train.DEFAULTS)  # every setting, in DEFAULTS' order
    for key, default in train.DEFAULTS.items():  # the default as written parses back to the value
        value = shown[key].partition("=")[2].partition("  # ")[0]
        assert train.parse_value(key, value.strip("\"'"), default) == default, key
    assert "evaluations without a val improvement" in shown["patience"]


def test_plot_takes_one_out_dir(monkeypatch, tmp_path):
    """--plot takes one out_dir, as `--plot=DIR` or `--plot DIR`; two are an error."""
    drawn = []
    monkeypatch.setattr(train, "plot", drawn.append)
    for argv in (["--plot=a"], ["--plot", "a"]):
        monkeypatch.setattr(sys, "argv", ["train.py", *argv])
        train.main()
    assert drawn == ["a", "a"]
    monkeypatch.setattr(sys, "argv", ["train.py", "--plot", "a", "b"])
    with pytest.raises(UserError, match="one out_dir"):
        train.main()


@pytest.mark.parametrize("argv, needle", [
    (["--max_iters=1e3"], "max_iters expects int"),  # a float where an int is expected
    (["--compile=maybe"], "compile expects bool"),
    (["--learning_rate=fast"], "learning_rate expects float"),
    (["--max_itres=10"], "Did you mean 'max_iters'"),  # a typo is not a new setting
    (["--max_iters"], "needs a value"),
])
def test_bad_command_line_values_are_errors(argv, needle):
    with pytest.raises(UserError, match=needle):
        train.load_config(argv)


def test_unknown_key_in_config_file_is_an_error(tmp_path):
    """nanoGPT's configurator turns a typo in a config file into a silent new global."""
    config_file = tmp_path / "c.py"
    config_file.write_text("learning_rte = 1e-3\n")
    with pytest.raises(UserError, match="learning_rate"):
        train.load_config([str(config_file)])


@pytest.mark.parametrize("text, needle", [
    ('max_iters = "3"\n', "max_iters expects int, got '3' (str)"),
    ("dataset = 5\n", "dataset expects str, got 5 (int)"),
    ("compile = 1\n", "compile expects bool, got 1 (int)"),
])
def test_config_file_values_are_python_values_of_the_defaults_type(tmp_path, text, needle):
    """A config file is Python: its values are taken as they are, and must have the default's
    type (only an int for a float is widened); "3" for an int is an error."""
    config_file = tmp_path / "c.py"
    config_file.write_text(text + "learning_rate = 1\n")
    with pytest.raises(UserError, match=re.escape(needle)):
        train.load_config([str(config_file)])
    config_file.write_text("learning_rate = 1\n")
    assert train.load_config([str(config_file)])["learning_rate"] == 1.0


@pytest.mark.parametrize("text, needles", [
    ("n_layer = = 3\n", ["c.py, line 1", "SyntaxError"]),
    ("n_layer = 2\nn_head = heads\n", ["c.py, line 2", "NameError", "heads"]),
    ("import no_such_module_here\n", ["ModuleNotFoundError"]),
])
def test_a_config_file_that_does_not_run_is_one_line(tmp_path, text, needles):
    """A config file that does not run is one line naming the file, the line and the error. (That
    train.py's own process prints a user error as one line: test_bad_setting_from_the_command_line_is_one_line.)"""
    config_file = tmp_path / "c.py"
    config_file.write_text(text)
    assert_one_line_error(run_in_process(train.main, config_file), *needles)


@pytest.mark.parametrize("argv, needle", [
    (["--batch_size=0"], "batch_size must be >= 1"),
    (["--block_size=0"], "block_size must be >= 1"),
    (["--eval_interval=0"], "eval_interval must be >= 1"),  # modulo by zero
    (["--log_interval=0"], "log_interval must be >= 1"),
    (["--eval_iters=0"], "eval_iters must be >= 1"),
    (["--gradient_accumulation_steps=0"], "gradient_accumulation_steps must be >= 1"),  # trained nothing
    (["--max_iters=-1"], "max_iters must be >= 0"),  # never reached: an endless run
    (["--seed=-1"], "seed must be >= 0"),
    (["--learning_rate=-1"], "learning_rate must be >= 0"),
    (["--dropout=1.5"], "dropout must be in [0, 1)"),
    (["--beta2=1"], "beta2 must be in [0, 1)"),
    (["--n_head=0"], "n_head must be >= 1"),
    (["--n_embd=32", "--n_head=3"], "multiple of n_head=3"),
    (["--backend=mpi"], "unknown backend 'mpi'"),  # before any rank joins a group
    (["--lr_schedule=linear"], "unknown lr_schedule 'linear'"),
    (["--cooldown_frac=1"], "cooldown_frac must be in (0, 1)"),  # no flat phase: no length to decide again
    (["--out_dir="], "out_dir is empty"),  # wrote the run into the current directory
    (["--warmup_iters=200", "--lr_decay_iters=100"], "warmup_iters=200 exceeds lr_decay_iters=100"),
    (["--min_lr=1e-3", "--learning_rate=1e-4"], "min_lr=0.001 exceeds learning_rate=0.0001"),
])
def test_values_that_make_no_sense_are_errors(argv, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        train.load_config(argv)


def test_contradictory_lr_settings_are_fine_without_decay():
    cfg = train.load_config(["--decay_lr=False", "--warmup_iters=200", "--lr_decay_iters=100", "--min_lr=1"])
    assert cfg["warmup_iters"] == 200 and cfg["min_lr"] == 1.0


def test_a_zero_batch_size_is_one_line(char_data, tmp_path):
    assert_one_line_error(train_run(char_data, tmp_path / "out", "--batch_size=0", check=False), "batch_size")


def shipped_config(name):
    return train.load_config([str(ROOT / "config" / f"{name}.py")])


def readme_says(pattern):
    """The groups of `pattern` in README.md, its whitespace runs read as one space."""
    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    found = re.search(pattern, text)
    assert found, f"README.md no longer says {pattern!r}"
    return found.groups()


def parameter_count(cfg, vocab_size):
    """The parameters of cfg's model with vocab_size tokens, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = gpt.GPT(gpt.GPTConfig(vocab_size=vocab_size, **{k: cfg[k] for k in train.MODEL_KEYS}))
    return sum(p.numel() for p in model.parameters())


def written_as(n, stated):
    """n, cut to the digits of `stated`, is `stated`: "0.8M" holds 0.80M..0.89M, "124M" 124.0M..124.9M."""
    number, unit = stated[:-1], {"K": 1e3, "M": 1e6, "B": 1e9}[stated[-1]]
    return float(number) <= n / unit < float(number) + 10 ** -len(number.partition(".")[2])


README_VOCAB = {"char": r"\| `char` \(default\) \|[^|]*\| (\d+) for tiny shakespeare",
                "gpt2": r"\| `gpt2` \|[^|]*\| ([\d,]+) \|"}


def readme_vocab(kind):
    return int(readme_says(README_VOCAB[kind])[0].replace(",", ""))


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.py")), ids=lambda path: path.name)
def test_a_config_comment_prepares_the_dataset_the_config_trains_on(path):
    """Each config's opening comment has the prepare.py command of its data: the folder that
    command writes (its --out, else prepare.py's default) is the one the config's dataset names."""
    import prepare

    comment = [line.lstrip("# ") for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
    commands = re.findall(r"python prepare\.py([^&#]*)", " ".join(comment).replace("\\ ", " "))
    assert commands, f"{path.name} names no prepare.py command"
    parser = argparse.ArgumentParser()
    parser.add_argument("--input", nargs="+")
    parser.add_argument("--out")
    parser.add_argument("--tokenizer", default="char")
    args, _ = parser.parse_known_args(commands[0].split())
    assert batches.dataset_dir(train.load_config([str(path)])["dataset"]) == Path(args.out or prepare.default_out(args))


def test_small_config_is_the_quick_start_readme_describes():
    """README: a 0.8M-parameter model trained for 5 minutes (the time budget), on the WSD schedule,
    with a 100-token sample at each evaluation, on tiny shakespeare's 65 characters."""
    cfg = shipped_config("small")
    params, minutes = readme_says(r"trains a ([\d.]+M)-parameter GPT on it for (\d+) minutes on any CPU "
                                  r"\(config/small\.py's time budget\)")
    n = parameter_count(cfg, readme_vocab("char"))
    assert written_as(n, params), f"{n:,} parameters, README says {params}"
    assert cfg["time_budget_s"] == 60 * int(minutes)
    assert readme_says(r"`small\.py` \(CPU, (\d+) minutes\)") == (minutes,)
    assert (cfg["lr_schedule"],) == readme_says(r'With `lr_schedule = "(\w+)"` \(config/small\.py\)')
    assert cfg["eval_sample_tokens"] == int(readme_says(r"`eval_sample_tokens` \(config/small\.py: (\d+)\)")[0])


def test_default_and_xl_configs_are_the_gpt2_models_readme_names():
    """README: default.py is GPT-2 124M, gpt2_xl.py GPT-2 XL (1.5B) sharded with FSDP."""
    vocab = readme_vocab("gpt2")
    default, xl = shipped_config("default"), shipped_config("gpt2_xl")
    n = parameter_count(default, vocab)
    (stated,) = readme_says(r"`default\.py` \(GPT-2 (\d+M) on GPUs\)")
    assert written_as(n, stated), f"{n:,} parameters, README says {stated}"
    n = parameter_count(xl, vocab)
    (stated,) = readme_says(r"`gpt2_xl\.py` \(([\d.]+B), FSDP\)")
    assert written_as(n, stated), f"{n:,} parameters, README says {stated}"
    assert readme_says(r"train\.py config/gpt2_xl\.py # GPT-2 XL, fsdp = (\w+)") == (str(xl["fsdp"]),)
    assert xl["fsdp"] is True
    assert not default["fsdp"]  # README: "DDP: default.py"


def test_chat_config_fine_tunes_the_small_model_as_readme_says():
    """README: config/chat.py starts from config/small.py's checkpoint for 600 steps at learning_rate
    1e-3 without weight decay (a fixed length: no time budget), and sample.py reads its out_dir."""
    cfg, small = shipped_config("chat"), shipped_config("small")
    init_from, steps, lr = readme_says(r"python train\.py config/chat\.py # from (\S+): (\d+) steps at "
                                       r"learning_rate (\S+), no weight decay")
    assert cfg["init_from"] == init_from == f"{small['out_dir']}/ckpt.pt"
    assert cfg["max_iters"] == cfg["lr_decay_iters"] == int(steps) and cfg["time_budget_s"] == 0
    assert cfg["learning_rate"] == float(lr) and cfg["weight_decay"] == 0
    assert readme_says(r"python sample\.py --out_dir (\S+) --chat") == (cfg["out_dir"],)


def test_verdict_config_trains_on_the_20_kb_corpus_its_comment_names(verdict_path):
    """README: verdict.py trains on a 20 KB corpus, the file its comment downloads."""
    (kb,) = readme_says(r"`verdict\.py` \(a (\d+) KB corpus\)")
    assert int(kb) <= verdict_path.stat().st_size / 1000 < int(kb) + 1
    comment = (ROOT / "config" / "verdict.py").read_text(encoding="utf-8")
    assert re.search(r"https://\S+/" + re.escape(verdict_path.name) + r"\n", comment)


def test_bad_setting_from_the_command_line_is_one_line():
    assert_one_line_error(run_script("train.py", "--n_layr=2"), "n_layer")


# --- device and precision -----------------------------------------------------------------------

def test_absent_device_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    with pytest.raises(UserError, match="CUDA is not available"):
        common.resolve_device("cuda")
    assert common.resolve_device("auto") in ("cpu", "mps")


def test_cpu_with_an_index_is_plain_cpu():
    """--device=cpu:0 trained, but its checkpoint then held storages tagged 'cpu:0' that
    torch.load could not map back (resume and sample.py failed)."""
    assert common.resolve_device("cpu:0") == "cpu"
    assert common.resolve_device("cpu:3") == "cpu"
    assert common.resolve_device("cpu") == "cpu"


def test_dtype_resolution():
    assert common.resolve_dtype("float32", "cpu") == torch.float32
    assert common.resolve_dtype("auto", "cpu") == (torch.bfloat16 if common.cpu_has_bf16() else torch.float32)
    with pytest.raises(UserError, match="float16 needs a CUDA device"):
        common.resolve_dtype("float16", "cpu")


# --- training runs ------------------------------------------------------------------------------

def test_short_run_lowers_loss_and_writes_metrics_and_checkpoints(char_data, out_dir):
    train_run(char_data, out_dir, "--max_iters=40", "--eval_interval=20", "--log_interval=10")
    records = metrics(out_dir)
    logs = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["iter"] for r in logs] == [10, 20, 30, 40]
    assert [r["iter"] for r in evals] == [0, 20, 40]
    for r in logs:
        assert {"iter", "elapsed_s", "lr", "loss"} <= r.keys()
    for r in evals:
        assert {"iter", "elapsed_s", "lr", "train_loss", "val_loss", "val_ppl", "val_acc"} <= r.keys()
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
        assert 0 <= r["val_acc"] <= 1
    vocab = json.loads((char_data / "meta.json").read_text())["vocab_size"]
    assert evals[0]["val_loss"] == pytest.approx(math.log(vocab), rel=0.1)  # untrained: uniform
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    assert evals[-1]["val_acc"] > evals[0]["val_acc"]
    assert json.loads((out_dir / "config.json").read_text())["n_embd"] == 32

    ckpt = gpt.load_checkpoint(out_dir / "ckpt.pt")
    best = gpt.load_checkpoint(out_dir / "best.pt")
    assert ckpt["iter_num"] == 40 and "optimizer" in ckpt and "optimizer" not in best
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    assert best["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in evals))
    assert ckpt["tokenizer"]["kind"] == "char"


def test_resume_after_a_checkpoint_matches_an_uninterrupted_run(char_data, tmp_path):
    """Resuming must restore model, optimizer, LR step, batch sampler and dropout RNG exactly."""
    common = ["--eval_interval=15", "--log_interval=1", "--dropout=0.1"]
    train_run(char_data, tmp_path / "straight", *common, "--max_iters=30")
    train_run(char_data, tmp_path / "resumed", *common, "--max_iters=15")
    train_run(char_data, tmp_path / "resumed", *common, "--max_iters=30", "--init_from=resume")
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 31))
    for it in range(16, 31):
        assert resumed[it] == pytest.approx(straight[it], abs=1e-6), it
    final = lambda out: [r for r in metrics(out) if "val_loss" in r][-1]["val_loss"]
    assert final(tmp_path / "resumed") == pytest.approx(final(tmp_path / "straight"), abs=1e-6)


def test_metrics_after_a_kill_hold_each_iteration_once(char_data, tmp_path):
    """A run killed after its last checkpoint has logged iterations (and maybe half a line) that
    the resumed run does again: metrics.jsonl must end up with each iteration once, as an
    uninterrupted run's does, and a new run in a folder with an old metrics.jsonl starts it anew."""
    common = ["--eval_interval=5", "--log_interval=1"]
    train_run(char_data, tmp_path / "straight", *common, "--max_iters=10")
    run = tmp_path / "run"
    train_run(char_data, run, *common, "--max_iters=5")
    with open(run / "metrics.jsonl", "a") as f:  # what a SIGKILL at iter 7 leaves behind
        f.write('{"iter": 6, "loss": 9.9}\n{"iter": 7, "loss": 9.9}\n{"iter": 8, "lo')
    train_run(char_data, run, *common, "--max_iters=10", "--init_from=resume")
    iters = lambda out: [(r["iter"], "val_loss" in r) for r in metrics(out)]
    assert iters(run) == iters(tmp_path / "straight")
    assert 9.9 not in losses(run).values()

    (run / "ckpt.pt").unlink()  # a new run here (the earlier one's checkpoint removed by hand)
    train_run(char_data, run, *common, "--max_iters=3")
    assert [r["iter"] for r in metrics(run) if "loss" in r] == [1, 2, 3]


def test_sigterm_saves_a_checkpoint_that_resumes_exactly(char_data, tmp_path):
    """A pre-empted job (SIGTERM) stops at a step boundary and loses nothing."""
    settings = ["--eval_interval=1000", "--log_interval=1", "--dropout=0.1"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY, f"--dataset={char_data}",
                             *settings, "--max_iters=1000", f"--out_dir={killed}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_logged_losses(proc, killed, 5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr  # so `train.py && ...` stops there
    stopped_at = gpt.load_checkpoint(killed / "ckpt.pt")["iter_num"]
    assert 5 <= stopped_at < 1000, stdout
    assert f"stopped by SIGTERM at iter {stopped_at}" in stdout
    end = f"--max_iters={stopped_at + 8}"
    train_run(char_data, killed, *settings, end, "--init_from=resume")
    train_run(char_data, tmp_path / "straight", *settings, end)
    straight, resumed = losses(tmp_path / "straight"), losses(killed)
    for it in range(stopped_at + 1, stopped_at + 9):
        assert resumed[it] == pytest.approx(straight[it], abs=1e-6), it


def test_two_ddp_ranks_match_one_rank_with_twice_the_accumulation(char_data, tmp_path):
    """gradient_accumulation_steps is global: 2 gloo ranks x 1 micro-step == 1 rank x 2."""
    settings = ["--max_iters=8", "--eval_interval=4", "--log_interval=1", "--gradient_accumulation_steps=2"]
    single = tmp_path / "single"
    train_run(char_data, single, *settings)
    ddp = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "train.py"), *TINY, f"--dataset={char_data}", *settings, f"--out_dir={ddp}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("iter 8: loss") == 1  # only rank 0 prints
    one, two = losses(single), losses(ddp)
    assert sorted(two) == list(range(1, 9))
    for it in one:
        assert two[it] == pytest.approx(one[it], abs=1e-5), it
    val = lambda out: [r["val_loss"] for r in metrics(out) if "val_loss" in r]
    assert val(ddp) == pytest.approx(val(single), abs=1e-5)


def test_ctrl_c_saves_where_it_stopped_and_exits_130(char_data, tmp_path):
    """Ctrl-C saves where the run stopped and exits 130, so `train.py && sample.py` stops there."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY, f"--dataset={char_data}",
                             "--eval_interval=1000", "--log_interval=1", "--max_iters=1000",
                             f"--out_dir={out}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_logged_losses(proc, out, 2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    stopped_at = gpt.load_checkpoint(out / "ckpt.pt")["iter_num"]
    assert f"stopped by SIGINT at iter {stopped_at}" in stdout
    assert max(losses(out)) == stopped_at


def worker_pid(launcher_pid, rank):
    """The pid of torchrun's worker process of `rank`: its child whose environment has RANK=rank."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):  # a process that ended meanwhile
            continue
        if ppid == launcher_pid and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    raise AssertionError(f"no worker of rank {rank} under pid {launcher_pid}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers in /proc")
def test_sigterm_to_one_ddp_rank_stops_every_rank_and_resumes_exactly(char_data, tmp_path):
    """Under torchrun a signal to any one rank stops every rank at the same log step (where the
    ranks agree on it), with ckpt.pt saved by rank 0, exit status 143, and an exact resume."""
    settings = ["--eval_interval=1000", "--log_interval=3", "--gradient_accumulation_steps=2"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(torchrun(char_data, killed, *settings, "--max_iters=1000"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_logged_losses(proc, killed, 2)
    os.kill(worker_pid(proc.pid, rank=1), signal.SIGTERM)  # rank 0, which saves, gets no signal
    stdout, stderr = proc.communicate(timeout=120)
    stopped_at = gpt.load_checkpoint(killed / "ckpt.pt")["iter_num"]
    assert stopped_at % 3 == 0 and 6 <= stopped_at < 1000, stdout + stderr[-3000:]
    assert f"stopped by SIGTERM at iter {stopped_at}" in stdout
    # torchrun's report of the ranks that failed: the signalled rank's 143, and for the other its
    # own 143 or -15 (torchrun itself terminated it, with SIGTERM, as it was exiting)
    codes = re.findall(r"exitcode  : (-?\d+)", stderr)
    assert "143" in codes and set(codes) <= {"143", "-15"}, stderr[-3000:]

    end = f"--max_iters={stopped_at + 6}"
    result = subprocess.run(torchrun(char_data, killed, *settings, end, "--init_from=resume"),
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    train_run(char_data, tmp_path / "straight", *settings, end)  # 1 process == 2 (the test above)
    straight, resumed = losses(tmp_path / "straight"), losses(killed)
    assert sorted(resumed) == list(range(3, stopped_at + 7, 3))
    for it in resumed:
        assert resumed[it] == pytest.approx(straight[it], abs=1e-5), it
    val = lambda out: [r["val_loss"] for r in metrics(out) if "val_loss" in r]
    assert val(killed) == pytest.approx(val(tmp_path / "straight"), abs=1e-5)


def test_bf16_autocast_on_cpu_trains(char_data, out_dir):
    train_run(char_data, out_dir, "--dtype=bfloat16", "--max_iters=20", "--eval_interval=20")
    evals = [r for r in metrics(out_dir) if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5


def test_fine_tune_from_a_checkpoint_path(char_data, tmp_path):
    train_run(char_data, tmp_path / "base", "--max_iters=20", "--eval_interval=20")
    base_val = [r for r in metrics(tmp_path / "base") if "val_loss" in r][-1]["val_loss"]
    train_run(char_data, tmp_path / "tuned", "--max_iters=10", "--eval_interval=10",
              f"--init_from={tmp_path / 'base' / 'ckpt.pt'}", "--learning_rate=3e-4")
    first_eval = [r for r in metrics(tmp_path / "tuned") if "val_loss" in r][0]
    assert first_eval["val_loss"] == pytest.approx(base_val, abs=1e-5)  # starts from its weights


# --- errors -------------------------------------------------------------------------------------

def test_missing_dataset_names_the_prepare_command(tmp_path):
    result = train_run(tmp_path / "nothing", tmp_path / "out", check=False)
    assert_one_line_error(result, "prepare.py")


def test_block_size_beyond_the_data_is_an_error(char_data, tmp_path):
    result = train_run(char_data, tmp_path / "out", "--block_size=100000", check=False)
    assert_one_line_error(result, "block_size")


def test_resume_with_another_shape_names_the_field(char_data, tmp_path):
    train_run(char_data, tmp_path / "out", "--max_iters=2", "--eval_interval=2")
    result = train_run(char_data, tmp_path / "out", "--max_iters=4", "--init_from=resume",
                       "--n_layer=3", check=False)
    assert_one_line_error(result, "n_layer=2")


def test_what_resuming_needs_is_checked_in_one_line(char_data, tmp_path):
    """Resuming a finished run or a weights-only file, --init_from=OUT_DIR and --init_from a file
    that is not a checkpoint are each one line that says what to do instead."""
    run = tmp_path / "run"
    train_run(char_data, run, "--max_iters=4", "--eval_interval=2")
    result = run_in_process(train.main, *TINY, f"--dataset={char_data}", f"--out_dir={run}", "--init_from=resume",
                        "--max_iters=2")
    assert_one_line_error(result, "iter 4", "max_iters=2")
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    (weights_only / "ckpt.pt").write_bytes((run / "best.pt").read_bytes())
    result = train_run(char_data, weights_only, "--max_iters=8", "--init_from=resume", check=False)
    assert_one_line_error(result, "weights only")
    result = train_run(char_data, tmp_path / "out", f"--init_from={run}", check=False)
    assert_one_line_error(result, f"--init_from={run / 'ckpt.pt'}")
    result = train_run(char_data, tmp_path / "out", f"--init_from={run / 'config.json'}", check=False)
    assert_one_line_error(result, "not a torch.save archive")
    assert gpt.load_checkpoint(run / "ckpt.pt")["iter_num"] == 4  # untouched by all of this


def test_a_new_run_never_overwrites_an_earlier_one(char_data, tmp_path):
    """A new run in an out_dir that holds one is an error: its ckpt.pt is never replaced."""
    run = tmp_path / "run"
    train_run(char_data, run, "--max_iters=2", "--eval_interval=2")
    saved = (run / "ckpt.pt").read_bytes()
    assert_one_line_error(train_run(char_data, run, "--max_iters=4", check=False), "--init_from=resume")
    result = train_run(char_data, run, f"--init_from={run / 'ckpt.pt'}", check=False)
    assert_one_line_error(result, "--init_from=resume")
    assert (run / "ckpt.pt").read_bytes() == saved
    train_run(char_data, run, "--max_iters=4", "--init_from=resume")  # what the message says works


def test_an_out_dir_that_cannot_be_written_is_one_line(char_data, tmp_path):
    taken = tmp_path / "notes.txt"
    taken.write_text("keep me")
    assert_one_line_error(train_run(char_data, taken, check=False), "out_dir", "notes.txt")
    assert_one_line_error(train_run(char_data, taken / "sub", check=False), "out_dir")
    assert taken.read_text() == "keep me"


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(char_data, tmp_path):
    out = tmp_path / "out"
    result = train_run(char_data, out, "--max_iters=50", "--eval_interval=1000", "--log_interval=1",
                       "--learning_rate=1e12", "--warmup_iters=0", "--grad_clip=0.0", check=False)
    assert_one_line_error(result, "at iter")
    ckpt = gpt.load_checkpoint(out / "ckpt.pt")  # the iter-0 checkpoint is intact
    assert ckpt["iter_num"] == 0
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


@pytest.mark.parametrize("key, package", [("tensorboard_log", "tensorboard"), ("wandb_log", "wandb")])
def test_logging_without_its_package_is_one_line_before_writing(char_data, out_dir, key, package):
    """tensorboard_log / wandb_log without their package is one line, before out_dir is made."""
    if importlib.util.find_spec(package):
        pytest.skip(f"{package} is installed here")
    cfg = train.load_config([*TINY, f"--dataset={char_data}", f"--out_dir={out_dir}", f"--{key}=True"])
    with pytest.raises(UserError, match=f"^{key}=True needs {package}: pip install {package}$"):
        train.train(cfg)
    assert not out_dir.exists()


def test_pickled_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "model_args": {}, "payload": argparse.Namespace(x=1)}, path)
    with pytest.raises(UserError, match="pickled"):
        gpt.load_checkpoint(path)


KILLED_WRITER = """
import io, os, sys, time
import torch
sys.path.insert(0, sys.argv[3])
from gpt import save_checkpoint

path, moment = sys.argv[1], sys.argv[2]
armed, fsyncs = False, 0
save, fsync, replace = torch.save, os.fsync, os.replace


def stop_here(where):  # the second save waits at `moment` to be killed
    if armed and where == moment:
        print(where, flush=True)
        time.sleep(600)


def half_saved(obj, f):
    if armed and moment == "writing":
        buffer = io.BytesIO()
        save(obj, buffer)
        with open(f, "wb") as out:
            out.write(buffer.getvalue()[:buffer.tell() // 2])
        stop_here("writing")
    save(obj, f)


def counted_fsync(fd):
    global fsyncs
    fsyncs += 1
    stop_here("file fsync" if fsyncs % 2 else "folder fsync")
    fsync(fd)


def stopped_replace(src, dst):
    stop_here("rename")
    replace(src, dst)


torch.save, os.fsync, os.replace = half_saved, counted_fsync, stopped_replace
for i in (1, 2):
    armed = i == 2
    save_checkpoint({"model": {"w": torch.full((1000,), float(i))}, "i": i}, path)
print("not stopped", flush=True)
"""


def test_a_killed_writer_never_leaves_a_broken_checkpoint(tmp_path):
    """SIGKILL at each moment of save_checkpoint replacing a checkpoint (half of the new file
    written, before its fsync, before the rename, after it) leaves the old checkpoint whole until
    the rename and the new one whole from then on."""
    moments = {"writing": 1, "file fsync": 1, "rename": 1, "folder fsync": 2}  # the checkpoint left on disk
    writers = {moment: subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path / f"{i}.pt"), moment,
                                         str(ROOT)], stdout=subprocess.PIPE, text=True)
               for i, moment in enumerate(moments)}
    try:
        for i, (moment, proc) in enumerate(writers.items()):
            assert proc.stdout.readline().strip() == moment  # it waits there
            proc.kill()
            proc.wait()
            ckpt = torch.load(tmp_path / f"{i}.pt", weights_only=True)
            assert ckpt["i"] == moments[moment] and (ckpt["model"]["w"] == ckpt["i"]).all(), moment
    finally:
        for proc in writers.values():
            proc.kill()
            proc.wait()
            proc.stdout.close()


def test_patience_and_the_end_of_a_run_save_and_resume_once(char_data, tmp_path):
    """With a zero learning rate val never improves: patience=2 must stop after 3 evaluations.
    With always_save_checkpoint=False ckpt.pt was the last improvement's (iter 0), so continuing a
    finished run silently restarted there; resuming an early-stopped run (or one at max_iters)
    evaluated again and duplicated its last metrics records."""
    run = tmp_path / "run"
    frozen = ["--always_save_checkpoint=False", "--learning_rate=0.0", "--min_lr=0.0",
              "--eval_interval=2", "--log_interval=1"]
    train_run(char_data, run, *frozen, "--max_iters=100", "--patience=2")
    assert [r["iter"] for r in metrics(run) if "val_loss" in r] == [0, 2, 4]
    assert gpt.load_checkpoint(run / "ckpt.pt")["iter_num"] == 4  # the run's end, not its best
    best = min(r["val_loss"] for r in metrics(run) if "val_loss" in r)

    again = train_run(char_data, run, *frozen, "--max_iters=100", "--patience=2", "--init_from=resume",
                      check=False)
    assert_one_line_error(again, "raise --patience")
    result = train_run(char_data, run, *frozen, "--max_iters=6", "--patience=10", "--init_from=resume")
    assert f"resuming from {run / 'ckpt.pt'} at iter 4 (best val loss {best:.4f})" in result.stdout
    assert [(r["iter"], "val_loss" in r) for r in metrics(run)] == [
        (0, True), (1, False), (2, False), (2, True), (3, False), (4, False), (4, True),
        (5, False), (6, False), (6, True)]
    records = metrics(run)
    again = train_run(char_data, run, *frozen, "--max_iters=6", "--patience=10", "--init_from=resume",
                      check=False)
    assert_one_line_error(again, "iter 6", "raise --max_iters")
    assert metrics(run) == records


def test_compiled_training_follows_eager_training(char_data, tmp_path):
    """compile=True must train the same model (maybe_compile's warm-up on the step's shapes and
    precision, and inductor's exp-based tanh on a CPU, must not change what is learned)."""
    common = ["--max_iters=6", "--eval_interval=3", "--log_interval=1", "--dropout=0.0", "--n_layer=1"]
    train_run(char_data, tmp_path / "eager", *common)
    compiled = train_run(char_data, tmp_path / "compiled", *common, "--compile=True")
    assert "torch.compile failed" not in compiled.stdout
    eager_losses, compiled_losses = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert eager_losses.keys() == compiled_losses.keys() and len(eager_losses) == 6
    for it, loss in eager_losses.items():
        assert compiled_losses[it] == pytest.approx(loss, rel=1e-4), it


def test_compile_warm_up_leaves_the_random_numbers_alone(monkeypatch):
    """The compile warm-up's dropout draws from a forked RNG, not from the random numbers a resume
    has just restored (a resumed compiled run would drift from the uninterrupted one)."""
    monkeypatch.setattr(torch, "compile", lambda model: model)  # the warm-up itself, in eager
    model = gpt.GPT(gpt.GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8,
                                      dropout=0.5)).train()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert common.maybe_compile(model, "cpu", contextlib.nullcontext(), 2, 8) is model
    assert torch.equal(torch.get_rng_state(), before)


def test_compile_failure_falls_back_to_eager(monkeypatch, capsys):
    def broken_compile(model):
        raise RuntimeError("no C compiler")
    monkeypatch.setattr(torch, "compile", broken_compile)
    model = gpt.GPT(gpt.GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))
    assert common.maybe_compile(model, "cpu", contextlib.nullcontext(), 2, 8) is model
    assert "torch.compile failed (no C compiler)" in capsys.readouterr().out


def test_fine_tune_a_hugging_face_directory(verdict_path, tmp_path):
    """init_from a local HF GPT-2 folder: GPT-2 tokenizer data trains; a char dataset is refused."""
    hf_dir = tmp_path / "hf"
    torch.manual_seed(0)
    gpt.GPT(gpt.GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=32)).save_pretrained(hf_dir)
    data = tmp_path / "verdict"
    result = run_script("prepare.py", "--input", verdict_path, "--tokenizer", "gpt2", "--out", data)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    result = run_in_process(train.main, f"--init_from={hf_dir}", f"--dataset={data}", f"--out_dir={out}",
                        "--block_size=32", "--batch_size=4", "--eval_iters=2", "--max_iters=4",
                        "--eval_interval=4", "--device=cpu", "--dtype=float32", "--n_layer=9")
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = gpt.load_checkpoint(out / "ckpt.pt")
    assert ckpt["model_args"]["n_layer"] == 1 and ckpt["config"]["n_layer"] == 1  # the loaded shape
    assert ckpt["tokenizer"]["kind"] == "gpt2"


def test_gpt2_names_are_hub_ids_unless_a_local_folder_has_the_name(tmp_path, monkeypatch):
    """init_from and sample.py --ckpt take GPT-2's names on the Hub (gpt2, gpt2-medium/-large/-xl)
    and OWNER/NAME ids; a local folder of the same name, or a local OWNER folder, is a path instead,
    and so is anything that names a checkpoint file."""
    monkeypatch.chdir(tmp_path)
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "openai-community/gpt2"):
        assert gpt.is_hub_model_id(name), name
    for name in ("gpt3", "gpt2.pt", "out-small/ckpt.pt", "gpt2/", "a/b/c"):
        assert not gpt.is_hub_model_id(name), name
    (tmp_path / "gpt2").mkdir()
    assert not gpt.is_hub_model_id("gpt2") and gpt.is_hub_model_id("gpt2-medium")
    (tmp_path / "gpt2-medium").mkdir()
    assert not gpt.is_hub_model_id("gpt2-medium")
    (tmp_path / "openai-community").mkdir()
    assert not gpt.is_hub_model_id("openai-community/gpt2")


def test_hugging_face_weights_on_a_char_dataset_are_refused(char_data, tmp_path):
    hf_dir = tmp_path / "hf"
    vocab = json.loads((char_data / "meta.json").read_text())["vocab_size"]  # same size, other tokens
    gpt.GPT(gpt.GPTConfig(block_size=64, vocab_size=vocab, n_layer=1, n_head=2, n_embd=32)).save_pretrained(hf_dir)
    result = train_run(char_data, tmp_path / "out", f"--init_from={hf_dir}", check=False)
    assert_one_line_error(result, "tokenizer", "--tokenizer gpt2")


def test_a_tokenizer_mismatch_suggests_a_fix_that_works(char_data, tmp_path):
    """A tokenizer mismatch names a prepare.py command that works: `--tokenizer gpt2` for a
    Hugging Face folder, and 'a different character set' for two char vocabularies."""
    cfg = train.load_config([f"--dataset={char_data}"])
    char = load_tokenizer(char_data)
    args = dict(vocab_size=char.vocab_size, **{k: cfg[k] for k in train.MODEL_KEYS})
    hf_dir = tmp_path / "hf"
    for vocab_size in (char.vocab_size, 50257):  # the tokenizer check, then the vocab_size check
        hf = dict(model_args=args | dict(vocab_size=vocab_size), tokenizer=None)
        with pytest.raises(UserError, match="--tokenizer gpt2") as error:
            train.check_compatible(cfg, hf, char.vocab_size, char, hf_dir, resume=False)
        assert str(hf_dir) not in str(error.value).split("prepare.py")[-1]
    other_chars = char.to_dict() | dict(chars=sorted(set(char.chars) - {"!"} | {"~"}))
    ckpt = dict(model_args=args, tokenizer=other_chars)
    with pytest.raises(UserError, match="a different character set"):
        train.check_compatible(cfg, ckpt, char.vocab_size, char, tmp_path / "ckpt.pt", resume=False)


# -----------------------------------------------------------------------------
# Resuming takes the stored run's settings

def test_resume_needs_only_the_out_dir_and_continues_the_stored_run(tmp_path, char_data):
    """`--init_from=resume --out_dir=X` alone continues the run with its own settings (dataset,
    shape, schedule), and raising max_iters alone gives the losses of a run that was never stopped."""
    common = ["--eval_interval=4", "--log_interval=1", "--dropout=0.1"]
    train_run(char_data, tmp_path / "straight", *common, "--max_iters=12")
    run = tmp_path / "run"
    train_run(char_data, run, *common, "--max_iters=8")
    result = run_in_process(train.main, "--init_from=resume", f"--out_dir={run}", "--max_iters=12")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resume: max_iters 8 -> 12" in result.stdout
    straight, resumed = losses(tmp_path / "straight"), losses(run)
    for it in range(9, 13):
        assert resumed[it] == pytest.approx(straight[it], abs=1e-6), it


def test_a_moved_run_resumes_where_it_is_now(char_data, tmp_path):
    """A run folder copied elsewhere resumes there: the resumed run writes to the --out_dir given,
    and the folder it was trained in stays as it was."""
    train_run(char_data, tmp_path / "first", "--max_iters=4", "--eval_interval=2")
    shutil.copytree(tmp_path / "first", tmp_path / "moved")
    before = {p.name: p.read_bytes() for p in (tmp_path / "first").iterdir()}
    result = run_in_process(train.main, "--init_from=resume", f"--out_dir={tmp_path / 'moved'}", "--max_iters=6")
    assert result.returncode == 0, result.stderr[-2000:]
    assert gpt.load_checkpoint(tmp_path / "moved" / "ckpt.pt")["iter_num"] == 6
    assert {p.name: p.read_bytes() for p in (tmp_path / "first").iterdir()} == before


@pytest.fixture(scope="module")
def stored_run(char_data, tmp_path_factory):
    """A finished 6-step run (warmup 5, cosine to iter 40) to resume with other settings."""
    run = tmp_path_factory.mktemp("stored") / "run"
    train_run(char_data, run, "--max_iters=6", "--eval_interval=3")
    return run


@pytest.mark.parametrize("change", ["--eval_interval=5", "--log_interval=2", "--patience=3", "--dropout=0.2",
                                    "--dtype=bfloat16", "--max_iters=30", "--grad_clip=0.5"])
def test_a_resume_may_change_what_keeps_it_the_same_run_and_says_so(stored_run, capsys, change):
    key, value = change[2:].split("=")
    cfg = train.load_config(["--init_from=resume", f"--out_dir={stored_run}", change])
    stored = gpt.load_checkpoint(stored_run / "ckpt.pt")["config"]
    assert cfg == stored | {key: cfg[key], "init_from": "resume"}
    assert str(cfg[key]) == str(train.parse_value(key, value, train.DEFAULTS[key]))
    assert f"resume: {key} {stored[key]} -> {cfg[key]}" in capsys.readouterr().out


@pytest.mark.parametrize("change, why", [
    ("--n_layer=3", "n_layer=2"), ("--batch_size=4", "batch_size=8"), ("--seed=7", "seed=1337"),
    ("--weight_decay=0.5", "weight_decay=0.1"), ("--learning_rate=1e-2", "jump"),
    ("--lr_decay_iters=80", "jump"), ("--warmup_iters=10", "jump"), ("--time_budget_s=60", "time_budget_s=0")])
def test_a_resume_refuses_what_would_make_it_another_run(stored_run, change, why):
    with pytest.raises(UserError, match=why):
        train.load_config(["--init_from=resume", f"--out_dir={stored_run}", change])


def test_settings_given_again_unchanged_are_no_change(stored_run, capsys, char_data):
    """A resume command may repeat the run's own settings (its config file): nothing to say."""
    argv = [*TINY, f"--dataset={char_data}", "--max_iters=6", "--eval_interval=3"]
    cfg = train.load_config([*argv, "--init_from=resume", f"--out_dir={stored_run}"])
    assert cfg == gpt.load_checkpoint(stored_run / "ckpt.pt")["config"] | {"init_from": "resume"}
    assert "resume:" not in capsys.readouterr().out


def test_resuming_a_folder_without_a_run_is_one_line(tmp_path):
    with pytest.raises(UserError, match="nothing to resume"):
        train.load_config(["--init_from=resume", f"--out_dir={tmp_path}"])


# -----------------------------------------------------------------------------
# The time budget

def test_a_budgeted_run_fixes_its_length_and_resumes_exactly(char_data, tmp_path, monkeypatch):
    """time_budget_s decides max_iters = lr_decay_iters once (printed, stored); a run stopped
    after the decision and resumed gives the losses of the same run never stopped."""
    settings = ["--eval_interval=20", "--log_interval=1", "--dropout=0.1", "--warmup_iters=25"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, clocked_train(tmp_path, step_s=[0.05]), *TINY, f"--dataset={char_data}",
                             *settings, "--time_budget_s=60", f"--out_dir={killed}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_logged_losses(proc, killed, 30)  # past the decision at iter 22
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    ckpt = gpt.load_checkpoint(killed / "ckpt.pt")
    n, stopped_at = ckpt["budget"]["max_iters"], ckpt["iter_num"]
    assert f"max_iters = lr_decay_iters = {n}" in stdout
    assert ckpt["config"]["max_iters"] == ckpt["config"]["lr_decay_iters"] == n
    assert stopped_at < n, "the budget ended the run before the signal: raise time_budget_s"
    use_step_clock(monkeypatch, step_s=0.05)
    resumed = run_in_process(train.main, "--init_from=resume", f"--out_dir={killed}", f"--max_iters={stopped_at + 6}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    train_run(char_data, tmp_path / "straight", *settings, f"--lr_decay_iters={n}", f"--max_iters={stopped_at + 6}")
    straight, after = losses(tmp_path / "straight"), losses(killed)
    for it in range(1, stopped_at + 7):
        assert after[it] == pytest.approx(straight[it], abs=1e-6), it


def test_a_budgeted_run_whose_steps_slow_down_ends_within_its_budget(char_data, tmp_path, monkeypatch, capsys):
    """Steps slower after the decision than when it was made: the run stops at the first log step
    where the budget has no room left, and still evaluates, saves and says so."""
    decide, clock = budget.decide_budget, time.time

    def decide_then_lose_the_time(cfg, *args):
        decision = decide(cfg, *args)
        monkeypatch.setattr(time, "time", lambda: clock() + cfg["time_budget_s"])  # the budget is spent
        return decision

    monkeypatch.setattr(budget, "decide_budget", decide_then_lose_the_time)
    out = tmp_path / "out"
    result = run_in_process(train.main, *TINY, f"--dataset={char_data}", f"--out_dir={out}", "--time_budget_s=60",
                            "--warmup_iters=25", "--eval_interval=1000", "--log_interval=5")
    assert result.returncode == 0, result.stderr[-2000:]
    decided = int(re.search(r"max_iters = lr_decay_iters = (\d+)", result.stdout).group(1))
    ended = re.search(r"the run ends at iter (\d+) of (\d+)", result.stdout)
    assert ended and int(ended.group(2)) == decided, result.stdout[-2000:]
    end = int(ended.group(1))
    assert end == 25 < decided  # the decision's own step (the end of warmup) is a log step
    assert gpt.load_checkpoint(out / "ckpt.pt")["iter_num"] == end
    assert [r["iter"] for r in metrics(out) if "val_loss" in r] == [0, end]


def test_ddp_ranks_agree_on_every_decision_of_a_budgeted_wsd_run(char_data, tmp_path):
    """Under torchrun every rank takes the slowest rank's timings, so all decide the same lengths at
    the same log steps (ranks that did not would part at the end, one waiting for the other): the
    2-rank run, whose rank 1 steps slower, decides by rank 1's speed, ends, and every LR it used
    is its final schedule's."""
    out = tmp_path / "ddp"
    script = clocked_train(tmp_path, step_s=[0.05, 0.08])
    result = subprocess.run(torchrun(char_data, out, *WSD, "--log_interval=5", "--gradient_accumulation_steps=2",
                                     "--time_budget_s=5", script=script),
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "time budget 5 s: 80.0 ms/iter" in result.stdout, result.stdout[-3000:]
    final = gpt.load_checkpoint(out / "ckpt.pt")
    cfg, end = final["config"], final["iter_num"]
    assert decided_lengths(result.stdout)[-1] == cfg["max_iters"] == final["budget"]["max_iters"]
    assert schedule.cooldown_start(cfg["max_iters"], 25, 0.25) < end <= cfg["max_iters"]
    steps = [r for r in metrics(out) if "loss" in r]
    assert [r["iter"] for r in steps] == list(range(5, end + 1, 5))
    assert all(r["lr"] == schedule.lr_at(cfg, r["iter"] - 1) for r in steps)


WSD = ["--lr_schedule=wsd", "--cooldown_frac=0.25", "--warmup_iters=25", "--eval_interval=1000"]


def decided_lengths(stdout):
    return [int(n) for n in re.findall(r"max_iters = lr_decay_iters = (\d+)", stdout)]


def test_a_wsd_run_whose_steps_slow_down_decides_again_and_never_changes_a_used_lr(
        char_data, tmp_path, monkeypatch):
    """Under a time budget a WSD run decides its length again at each log step while its LR is
    flat: steps that slow after the first decision give a shorter run that ends within the budget,
    and every step's LR is the final schedule's."""
    clock, decide = use_step_clock(monkeypatch, step_s=0.1), budget.decide_budget

    def decide_then_slow_down(*args, **kwargs):
        clock.step_s = 0.3  # from the first decision on, every step takes 3x as long
        return decide(*args, **kwargs)

    monkeypatch.setattr(budget, "decide_budget", decide_then_slow_down)
    out = tmp_path / "out"
    result = run_in_process(train.main, *TINY, f"--dataset={char_data}", f"--out_dir={out}", *WSD,
                            "--time_budget_s=12", "--log_interval=5")
    assert result.returncode == 0, result.stderr[-2000:]
    first, last = decided_lengths(result.stdout)
    assert "decided again while the LR is flat" in result.stdout
    assert last < first, result.stdout[-2000:]
    ckpt = gpt.load_checkpoint(out / "ckpt.pt")
    cfg = ckpt["config"]
    assert cfg["max_iters"] == cfg["lr_decay_iters"] == ckpt["budget"]["max_iters"] == last
    # the end: max_iters, or a few steps before it where the cooldown ran slower than planned
    end = ckpt["iter_num"]
    assert schedule.cooldown_start(last, 25, 0.25) < end <= last
    rows = metrics(out)
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == end // 5 and all(r["lr"] == schedule.lr_at(cfg, r["iter"] - 1) for r in steps)
    assert rows[-1]["elapsed_s"] <= 12


def test_a_budgeted_wsd_run_stopped_and_resumed_is_the_run_of_its_final_length(char_data, tmp_path, monkeypatch):
    """A WSD run under a time budget, stopped while its LR is flat and resumed (which decides its
    length again), gives the losses of a run given that final length from the start."""
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, clocked_train(tmp_path, step_s=[0.05]), *TINY, f"--dataset={char_data}",
                             *WSD, "--dropout=0.1", "--log_interval=1", "--time_budget_s=4", f"--out_dir={killed}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_logged_losses(proc, killed, 30)  # past the first decision at iter 25
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    stopped_at = gpt.load_checkpoint(killed / "ckpt.pt")["iter_num"]
    use_step_clock(monkeypatch, step_s=0.05)
    resumed = run_in_process(train.main, "--init_from=resume", f"--out_dir={killed}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = gpt.load_checkpoint(killed / "ckpt.pt")
    n, end = final["budget"]["max_iters"], final["iter_num"]  # end < n where the budget's guard ended it
    assert decided_lengths(resumed.stdout)[-1] == n and stopped_at < schedule.cooldown_start(n, 25, 0.25) < end
    train_run(char_data, tmp_path / "straight", *WSD, "--dropout=0.1", "--log_interval=1",
              f"--lr_decay_iters={n}", f"--max_iters={end}")
    straight, after = losses(tmp_path / "straight"), losses(killed)
    assert sorted(after) == sorted(straight) == list(range(1, end + 1))
    for it in after:
        assert after[it] == pytest.approx(straight[it], abs=1e-6), it


# -----------------------------------------------------------------------------
# What a log line reports

@pytest.fixture
def in_process(monkeypatch):
    """train.train in this process, with the signal handlers it installs put back afterwards."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield train.train
    for s, handler in handlers.items():
        signal.signal(s, handler)


def test_mfu_is_never_above_100_percent(char_data, tmp_path, monkeypatch, in_process):
    monkeypatch.setattr(train, "measure_peak_flops", lambda device, dtype: 1.0)  # a probe far too slow
    in_process(train.load_config([*TINY, f"--dataset={char_data}", f"--out_dir={tmp_path / 'out'}",
                                  "--max_iters=4", "--log_interval=2"]))
    assert [r["mfu"] for r in metrics(tmp_path / "out") if "mfu" in r] == [1.0, 1.0]


def test_evaluation_time_is_not_counted_as_training_time(char_data, tmp_path, monkeypatch, in_process):
    """ms/iter after an evaluation that falls between two log lines counts only the steps."""
    evaluate, clock, skipped = train.evaluate, time.time, [0.0]
    monkeypatch.setattr(time, "time", lambda: clock() + skipped[0])  # a clock an evaluation moves on

    def slow_evaluate(*args):
        skipped[0] += 1000.0  # each evaluation "takes" 1000 s more
        return evaluate(*args)

    monkeypatch.setattr(train, "evaluate", slow_evaluate)
    in_process(train.load_config([*TINY, f"--dataset={char_data}", f"--out_dir={tmp_path / 'out'}",
                                  "--max_iters=10", "--log_interval=10", "--eval_interval=5"]))
    logs = {r["iter"]: r for r in metrics(tmp_path / "out") if "ms_per_iter" in r}
    # Iterations 1-10 include the evaluation at 5: counted, that would be >= 100 s per iteration.
    assert logs.keys() == {10}
    assert all(r["ms_per_iter"] < 50_000 for r in logs.values()), logs
    assert all(r["tokens_per_s"] == pytest.approx(8 * 32 * 1000 / r["ms_per_iter"]) for r in logs.values())
