"""One argument vocabulary for the four scripts (lib/cli.py): every flag has help and shows its
default, a concept is spelled one way everywhere, and no flag is accepted and then ignored."""
import importlib
import os
from collections import defaultdict

import pytest

from lib.cli import FLAGS, HelpFormatter, given_dests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("pretrain", "finetune", "search", "eval")


def parsers():
    return {name: importlib.import_module(name).get_args_parser() for name in SCRIPTS}


def flags(parser):
    return [a for a in parser._actions if a.dest != "help"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_gives_every_flag_a_text_and_its_default(script):
    parser = parsers()[script]
    assert parser.formatter_class is HelpFormatter
    shown = " ".join(parser.format_help().split())
    for action in flags(parser):
        assert action.help, f"{script}: {action.option_strings[0]} has no help"
        text = " ".join((action.help % {"default": action.default}).split())
        assert f"{text} (default: {action.default})" in shown, (script, action.dest)


def test_defaults_live_in_the_parser():
    found = parsers()
    assert found["pretrain"].get_default("epochs") == 20
    assert found["finetune"].get_default("epochs") == 5
    assert found["finetune"].get_default("lr") == 1e-4


# shared flags whose help a script gives itself (add_flags' helps): the shared text is another
# script's (pretrain.py's --lr default by optimizer)
OWN_HELP = {("help", "finetune", "lr")}


def test_a_concept_is_spelled_one_way_across_the_scripts():
    spellings, options = defaultdict(set), defaultdict(set)
    for script, parser in parsers().items():
        for action in flags(parser):
            spellings[action.dest].add(tuple(action.option_strings))
            for option in action.option_strings:
                options[option.lstrip("-").replace("_", "-").lower()].add(option)
            if action.dest in FLAGS:  # a shared flag is the shared definition, not a look-alike
                options_, kwargs = FLAGS[action.dest]
                assert action.option_strings[0] == options_[0], (script, action.dest)
                for key in ("type", "choices", "help"):
                    if key in kwargs and (key, script, action.dest) not in OWN_HELP:
                        assert getattr(action, key) == kwargs[key], (script, action.dest, key)
    assert not {d: s for d, s in spellings.items() if len(s) > 1}
    assert not {o: s for o, s in options.items() if len(s) > 1}
    assert not [o for s in options.values() for o in s if "_" in o]


def test_resume_amp_and_workers_wherever_they_apply():
    found = parsers()
    for script in ("pretrain", "finetune", "search"):
        assert found[script].get_default("resume") is None
        assert {"resume", "out", "overwrite"} <= {a.dest for a in flags(found[script])}
    for script in SCRIPTS:
        assert {"amp", "workers", "device"} <= {a.dest for a in flags(found[script])}, script


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_flag_is_accepted_and_ignored(script):
    """Every flag is read (args.<dest>) in the script that takes it: a script hands lib/ the
    values, not the whole `args`, so this sees them all."""
    with open(os.path.join(REPO, f"{script}.py")) as f:
        source = f.read()
    unread = [a.dest for a in flags(parsers()[script]) if f"args.{a.dest}" not in source]
    assert not unread, f"{script}.py never reads {unread}"
    if script == "finetune":
        assert "dataset" not in {a.dest for a in flags(parsers()[script])}


def flag_help(parser, flag):
    """The --help entry of `flag`, on one line."""
    text = parser.format_help()
    entry = text[text.index(f"\n  {flag} "):]
    return " ".join(entry[:entry.find("\n  -", 1)].split())


def test_lr_help_tells_each_scripts_own_default():
    """finetune.py's --help gave pretrain.py's rule (None: 1e-3 for adamw, 0.05 for sgd) beside
    its own default, 1e-4 for either optimizer."""
    assert flag_help(parsers()["pretrain"], "--lr").endswith(
        "None: 1e-3 for adamw, 0.05 for sgd (default: None)")
    finetune = flag_help(parsers()["finetune"], "--lr")
    assert "None" not in finetune and "1e-3" not in finetune and "0.05" not in finetune
    assert finetune.endswith("sgd and adamw alike, decayed to 0 by a cosine over the epochs "
                             "(default: 0.0001)")


def test_given_flags_are_told_from_defaults():
    parser = parsers()["pretrain"]
    assert given_dests(parser, ["--epochs", "20", "--lr", "0.1"]) == {"epochs", "lr"}
    assert given_dests(parser, []) == set()


# gloo's errors in a process whose peer exited, as torch 2.13 words them: a read finding the
# socket closed or reset (both seen with a 2-process script whose rank 1 exits before or during
# an all_reduce), and a write into it (gloo's writev error with EPIPE's text; not seen in those
# runs, so its line number is a stand-in).
PEER_GONE = [
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
    "[127.0.0.1]:19372. This is typically caused by a remote worker crashing.",
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:52872: "
    "Connection reset by peer. This is typically caused by a remote worker hanging",
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:600] writev [127.0.0.1]:38820: Broken pipe"]


@pytest.mark.parametrize("message", PEER_GONE)
def test_a_peers_connection_error_is_quiet_only_under_torchrun(monkeypatch, message):
    """A collective's error on a peer's exit stops a torchrun process without its traceback
    (another process failed first and said why); a WORLD_SIZE exported in the shell of a plain
    run does not make that process torchrun's, and its error keeps its traceback."""
    import argparse
    from lib.cli import run_script

    def main(args):
        raise RuntimeError(message)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="peer|pipe"):
        run_script(main, argparse.ArgumentParser(), argv=[])
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as stop:
        run_script(main, argparse.ArgumentParser(), argv=[])
    assert stop.value.code == 1


def test_run_eval_sh_takes_the_shared_flags_and_chooses_the_precision(tmp_path, monkeypatch):
    """`bash run/eval.sh` without a checkpoint is `python -m lib.results_table --run RUN`: its
    --data-root, --batch-size, --device, --workers are the shared definitions (README: each
    defined once in lib/cli.py), and --amp / --no-amp reach the scoring as eval.py's do (the
    README: a CUDA-trained run recorded bf16, give --no-amp on a CPU without it), where they
    were refused as unrecognized arguments."""
    import lib.experiment
    from lib.results_table import get_args_parser, main
    from tiny_checkpoints import make_checkpoint, write_tiny_data
    parser = get_args_parser()
    assert parser.formatter_class is HelpFormatter
    shared = {"data_root", "batch_size", "device", "workers", "amp"}
    for action in parser._actions:
        if action.dest in shared:
            shared.discard(action.dest)
            assert action.help == FLAGS[action.dest][1]["help"], action.dest
    assert not shared
    data = write_tiny_data(tmp_path / "data", tasks=("partseg",))
    make_checkpoint(tmp_path / "run" / "pretrain" / "best.pt", "partseg", data)
    asked = []

    def evaluate_checkpoint(*args, **kwargs):
        asked.append(args[6] if len(args) > 6 else kwargs.get("amp"))
        raise KeyboardInterrupt  # scored enough to know how

    monkeypatch.setattr(lib.experiment, "evaluate_checkpoint", evaluate_checkpoint)
    for flag, amp in (("--no-amp", False), ("--amp", True), (None, None)):
        argv = ["--run", str(tmp_path / "run"), "--device", "cpu"] + ([flag] if flag else [])
        with pytest.raises(KeyboardInterrupt):
            main(parser.parse_args(argv))
        assert asked.pop() is amp


def test_eval_names_a_fine_tune_that_quantized_no_layer_fp32():
    """eval.py's header: a fine-tune run with --bits 32 (or a policy of fp32 widths) records a
    quantization that left every layer fp32; it was called "quantized"."""
    from eval import precision
    assert precision(None) == "fp32"
    assert precision({"bits": {"head.0": 32, "head.2": None}}) == "fp32 (no layer quantized)"
    assert precision({"bits": {"head.0": 32, "head.2": 4}}) == "quantized"
