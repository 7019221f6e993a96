"""The command line as a new user meets it: ``attnlab``, one-line errors, the README's commands.

Two real runs (subprocesses, each paying JAX's start-up) are shared by several tests:
the README's main job through the ``attnlab`` console script, and ``python -P -m train``
on a token file, both started from a folder that holds its own ``models/``, ``configs/``
and ``train.py`` (each of which exits loudly if imported), so a run that picks up the
user's files instead of attnlab's fails. Every error case runs in-process through the
same ``main`` functions the console script calls.
"""

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tomllib

import numpy as np
import pytest

from attn.errors import UserError
from train import cli, trainer
from train.config_args import load_config, shipped_configs
from train.restore import restore_trained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
README = open(os.path.join(ROOT, "README.md")).read()

# Shrinks any LM config to seconds of CPU work (8 forced devices: batches divide by 8).
TINY_LM = ["--config.model.d_model=32", "--config.model.num_layers=1", "--config.data.batch_size=8",
           "--config.data.eval_batch_size=8", "--config.train.eval_steps=1",
           "--config.train.num_steps=4", "--config.train.log_every=2", "--config.optim.warmup_steps=1",
           "--config.train.progress_bar=False"]


def attnlab_script() -> str:
    path = os.path.join(BIN, "attnlab")
    assert os.path.isfile(path), (f"{path} is missing: the console script comes with "
                                  f"`pip install -e .` (pyproject [project.scripts])")
    return path


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    """A project folder of a user, with names that collide with attnlab's packages."""
    d = tmp_path_factory.mktemp("user_project")
    for pkg in ("models", "configs"):
        os.makedirs(d / pkg)
        (d / pkg / "__init__.py").write_text(f'raise SystemExit("USER {pkg.upper()} PACKAGE IMPORTED")\n')
    (d / "train.py").write_text('raise SystemExit("USER TRAIN.PY IMPORTED")\n')
    return d


def _run(argv, cwd, timeout=600):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # as a user's shell: nothing points at the checkout
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _readme_main_job() -> list[str]:
    """The train command of the README's first fenced block, line 1 (after the installs)."""
    first_block = README.split("```")[1].splitlines()[1:]
    assert len(first_block) == 2 and "pytest" in first_block[1], first_block  # .ci/run reads line 2
    cmd = shlex.split(first_block[0].split("&&")[-1])
    assert cmd[:2] == [".venv/bin/attnlab", "train"], cmd
    return cmd


@pytest.fixture(scope="module")
def main_job(user_folder):
    """The README's main job with tiny step counts, by the console script, in the user folder."""
    cmd = _readme_main_job()
    out = _run([attnlab_script(), *cmd[1:], *TINY_LM], cwd=user_folder)
    workdir = os.path.join(user_folder, cmd[cmd.index("--workdir") + 1])
    return out, workdir


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tokens") / "tokens.bin")
    np.random.default_rng(0).integers(0, 50, 4000).astype(np.uint16).tofile(path)
    return path




def _metrics(stdout: str) -> dict[str, str]:
    block = stdout.split("final metrics:\n", 1)[1].splitlines()
    return dict(line.strip().split(": ", 1) for line in block if line.startswith("  "))


def _assert_attnlabs_code_ran(out):
    assert out.returncode == 0, out.stderr[-3000:]
    assert "USER" not in out.stdout + out.stderr, out.stderr[-3000:]


# --------------------------------------------------------------------------- real runs
def test_console_script_runs_attnlab_not_the_users_folder(main_job):
    out, workdir = main_job
    _assert_attnlabs_code_ran(out)
    metrics = _metrics(out.stdout)
    assert metrics["metric"] == "eval/accuracy" and metrics["step"] == "4"
    assert out.stdout.strip().splitlines()[-1] == f"FINAL EVAL ACCURACY: {metrics['eval/accuracy']}"
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["4"]
    assert os.path.isfile(os.path.join(workdir, trainer.RUN_CONFIG))


def test_python_P_m_train_runs_attnlab_not_the_users_train_py(user_folder):
    # Plain `python -m train` would run the folder's train.py (Python's rule for -m);
    # -P leaves the folder off sys.path. A config that does not exist is the cheapest
    # proof that attnlab's command line answered (no compile).
    out = _run([sys.executable, "-P", "-m", "train", "--config", "nosuch", "--workdir", "w"], cwd=user_folder)
    assert out.returncode == cli.STATUS_USER_ERROR, out.stderr[-3000:]
    assert out.stderr.strip().splitlines() == [
        "python -m train: error: --config 'nosuch' is neither a file nor a shipped config; "
        f"shipped: {', '.join(shipped_configs())}"]


def test_token_file_from_the_command_line_reports_loss(token_file, tmp_path, capsys):
    workdir = str(tmp_path / "tokens")
    status = cli.main(["train", "--config", f"text:data={token_file},vocab=50", *TINY_LM,
                       "--config.data.seq_len=32", "--workdir", workdir])
    out = capsys.readouterr()
    assert status == 0, out.err[-3000:]
    metrics = _metrics(out.out)
    assert metrics["metric"] == "eval/loss"
    assert out.out.strip().splitlines()[-1] == f"FINAL EVAL LOSS: {metrics['eval/loss']}"
    # Trained on the file: 50 ids, so the model's vocabulary is 50 (the text's is 256).
    assert restore_trained(workdir)[0].vocab_size == 50
    assert float(metrics["eval/loss"]) < np.log(256)


def test_readme_checkpoint_snippet_generates(main_job):
    out, workdir = main_job
    assert out.returncode == 0, out.stderr[-3000:]
    (snippet,) = [b for b in _python_blocks() if "restore_trained" in b]
    printed = []
    exec(compile(snippet.replace('"runs/mqar"', repr(workdir)), "README", "exec"),
         {"print": lambda *a, **k: printed.append(a)})
    step, tokens = printed[-1]
    assert step == 4 and np.asarray(tokens).shape == (1, 1)


# --------------------------------------------------------------------------- errors
USER_ERRORS = [
    # (arguments after `attnlab train`, what the one line must say)
    (["--config", "mqar", "--config.model.impl=bogus"],
     "model.impl='bogus' is not a registered attention impl"),
    (["--config", "mqar", "--config.model.colour=red"], "unknown config key model.colour"),
    (["--config", "text", "--config.data.options.path=/x.bin"],
     "unknown config key data.options.path (--config.data.options.path=/x.bin); keys in data.options: "
     "['eval_fraction']; to change what the config builds use its own arguments: --config text:key=value"),
    (["--config", "mqar:steps=-5"], "config argument steps=-5: must be >= 1"),
    (["--config", "mqar:stepz=5"], "unknown config argument 'stepz'"),
    (["--config", "mqar", "--config.train.num_steps=0"], "train.num_steps must be >= 1, got 0"),
    (["--config", "mqar", "--config.model.d_model=wide"], "--config.model.d_model='wide': expected int"),
    (["--config", "nosuch"], "--config 'nosuch' is neither a file nor a shipped config"),
    (["--config", "mqar", "--config.mesh.shape=(16,1,1,1)"], "mesh.shape=(16, 1, 1, 1) needs 16 devices, have 8"),
    (["--config", "text:data=/nonexistent/t.bin,vocab=50"], "token file '/nonexistent/t.bin' does not exist"),
    (["--config", "text:vocab=50"], "config argument vocab=50 only applies with data=PATH"),
]


@pytest.mark.parametrize("args, says", USER_ERRORS, ids=[" ".join(a) for a, _ in USER_ERRORS])
def test_user_errors_are_one_line_naming_key_and_value(args, says, tmp_path, capsys):
    assert cli.main(["train", *args, "--workdir", str(tmp_path)]) == cli.STATUS_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attnlab train: error: "), err
    assert says in err[0], err[0]
    assert "warmup" not in err[0]  # steps=-5 is reported as steps


def test_verbose_shows_the_traceback_and_bugs_keep_theirs(tmp_path, capsys, monkeypatch):
    assert cli.main(["--verbose", "train", "--config", "nosuch", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("attnlab train: error: ")

    def bug(*a, **k):
        raise ValueError("a bug, not the user's")

    monkeypatch.setattr(trainer, "train_and_evaluate", bug)
    with pytest.raises(ValueError, match="a bug"):  # not turned into a one-line user error
        cli.main(["train", "--config", "mqar", "--workdir", str(tmp_path)])


def test_bad_data_file_is_a_user_error(tmp_path, capsys):
    bad = tmp_path / "odd.bin"
    bad.write_bytes(b"\x01\x02\x03")  # 3 bytes: not whole uint16 tokens
    assert cli.main(["train", "--config", f"text:data={bad},vocab=50", "--workdir", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "odd.bin" in line and "corrupt" in line


def test_subcommands_are_a_table_and_report_user_errors(capsys):
    assert set(cli.COMMANDS) == {"train", "generate", "perplexity", "export"}
    for cmd in cli.COMMANDS.values():
        assert callable(cmd.load())
    assert cli.main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert all(f"  {name} " in usage for name in cli.COMMANDS), usage
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert cli.main(["generate", "--model", "/nonexistent/m.gguf", "--prompt", "hi"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("attnlab generate: error: ") and "/nonexistent/m.gguf" in line
    assert cli.main(["perplexity", "--window", "1"]) == 2
    assert capsys.readouterr().err.strip() == "attnlab perplexity: error: --window=1: must be >= 2"


def test_pyproject_ships_configs_and_the_console_script():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert project["project"]["scripts"]["attnlab"] == "train.cli:main"
    assert "configs*" in project["tool"]["setuptools"]["packages"]["find"]["include"]
    extras = project["project"]["optional-dependencies"]
    assert any(d.startswith("jax[cuda") for d in extras["gpu"]) and any(d.startswith("jax[tpu]") for d in extras["tpu"])


# --------------------------------------------------------------------------- README
def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


_COMMANDS = ("attnlab", "python", "python3", "pip", "tensorboard")
_SYNOPSIS = re.compile(r"\[|\||\.\.\.|\*")  # a usage template, not a command to run


def _shell_commands() -> list[str]:
    """Every command in the README: all lines of bash blocks; in plain blocks (which also
    hold program output and the layout) and inline code spans, those that start like one."""
    cmds = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", README, re.S):
        if lang not in ("bash", "sh", ""):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip().rstrip("&").strip()
            if not line or line.startswith("#"):
                continue
            words = _words(line)
            if lang or (words and words[0] in _COMMANDS and not words[1].endswith(":")):
                cmds.append(line)
    for span in re.findall(r"`([^`\n]+)`", README):
        words = _words(span) if span.split()[0] in ("attnlab", "python", ".venv/bin/attnlab") else []
        if words and not _SYNOPSIS.search(span):  # a synopsis is not meant to be run
            cmds.append(span)
    return cmds


def _words(cmd: str) -> list[str]:
    words = shlex.split(cmd.split("&&")[-1])
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
        words.pop(0)
    if words and words[0].startswith(".venv/bin/"):
        words[0] = words[0][len(".venv/bin/"):]
    if words[:2] in (["python", "-P"], ["python", "-m"]) and "-m" in words:
        words = ["python", "-m", *words[words.index("-m") + 1:]]
    return words


def _check_train_args(args: list[str], tmp_path) -> None:
    """Parse and validate a README train command the way the command line would."""
    rest, overrides = cli.split_overrides(args)
    ns = cli._train_parser("attnlab train").parse_args(rest)
    spec = ns.config
    if spec.startswith("my_copy.py"):  # the README's own config file, written out here
        (block,) = [b for b in _python_blocks() if "register_source" in b]
        (tmp_path / "my_copy.py").write_text(block)
        spec = str(tmp_path / spec)
    elif re.search(r"[:,]data=/", spec):  # a placeholder path for your token file
        token = tmp_path / "tokens.bin"
        np.arange(4000, dtype=np.uint16).tofile(token)
        spec = re.sub(r"data=[^,]+", f"data={token}", spec)
    config = cli.build_train_config(spec, overrides)
    exp = trainer.parse_config(config)
    if int(np.prod([s for s in exp.mesh.shape if s > 0])) <= 8:  # fits the 8 test devices
        trainer.validate(config)  # the data source, the mesh, the batch split


def test_every_readme_command_parses_and_validates(tmp_path):
    generate = importlib.import_module("models.generate")  # not `from models import`: the
    perplexity = importlib.import_module("models.perplexity")  # package exports generate()

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = set(tomllib.load(f)["project"]["optional-dependencies"])
    seen = set()
    for cmd in _shell_commands():
        words = _words(cmd)
        kind = tuple(words[:3]) if words[:2] == ["python", "-m"] else tuple(words[:2])
        args = words[len(kind):]
        if len(words) == 1 or not args and kind[-1] in ("train", "generate", "perplexity"):
            continue  # prose naming the command ("`python -m train` calls ..."), not a run
        if words[0] == "python3":
            assert words[1:3] == ["-m", "venv"], cmd
        elif kind == ("pip", "install"):
            for extra in re.findall(r"\.\[([\w,-]+)\]", cmd):  # .[gpu] names a real extra
                assert set(extra.split(",")) <= extras, (cmd, extras)
        elif kind in (("attnlab", "train"), ("python", "-m", "train")):
            _check_train_args(words[2:] if words[0] == "attnlab" else words[3:], tmp_path)
        elif kind in (("attnlab", "generate"), ("python", "-m", "models.generate")):
            generate.build_parser().parse_args(words[2 if words[0] == "attnlab" else 3:])
        elif kind in (("attnlab", "perplexity"), ("python", "-m", "models.perplexity")):
            perplexity.build_parser().parse_args(words[2 if words[0] == "attnlab" else 3:])
        elif kind[:2] == ("python", "-m") and kind[2].startswith(("models.", "train.")):
            # Other tools (models.analysis.*, models.conversion.*, train.lofit): each has build_parser().
            importlib.import_module(kind[2]).build_parser().parse_args(args)
        elif kind[:2] == ("python", "-m") and kind[2].startswith("benchmarks."):
            assert importlib.util.find_spec(kind[2]) is not None, cmd  # needs the checkout
        elif kind[:2] == ("python", "-m") and kind[2] == "pytest":
            pass  # the test command itself (.ci/run)
        elif words[0] == "tensorboard":
            assert os.path.isfile(os.path.join(BIN, "tensorboard")), cmd
        else:
            raise AssertionError(f"README command of an unknown kind, add a check: {cmd!r}")
        seen.add(kind)
    # The README shows each way in; a command that is dropped or renamed shows here.
    assert {("attnlab", "train"), ("pip", "install"), ("tensorboard", "--logdir"),
            ("python", "-m", "models.generate"), ("python", "-m", "benchmarks.kernels")} <= seen, seen


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    """The op example and the own-config example (the checkpoint one needs a run: above)."""
    monkeypatch.chdir(tmp_path)
    for block in _python_blocks():
        if "restore_trained" in block:
            continue
        namespace = {"__name__": "readme_block"}
        exec(compile(block, "README", "exec"), namespace)
        if "get_config" in namespace:  # the own config: it builds and its source draws batches
            config = namespace["get_config"]("steps=10")
            exp, source = trainer.validate(config)
            b = source.batch("train", 0, 4)
            T = exp.data.seq_len
            np.testing.assert_array_equal(b["targets"][:, T // 2:], b["inputs"][:, :T - T // 2])
            assert b["weights"][:, T // 2:].all() and not b["weights"][:, :T // 2].any()


def test_config_by_name_and_by_path_agree():
    by_name = load_config("mqar:attn=gqa").to_dict()
    assert by_name == load_config(os.path.join(ROOT, "configs", "mqar.py:attn=gqa")).to_dict()
    with pytest.raises(UserError, match="did you mean the shipped --config mqar"):
        load_config("somewhere/else/mqar.py")
