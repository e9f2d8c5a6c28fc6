"""``lorafair.bench`` and ``lorafair bench``: shapes from presets, peft folders and transformers
configs; the registry-driven entries; the check that runs before timing; the command's exits."""

from __future__ import annotations

import argparse
import json
import pathlib

import pytest
import torch

from lorafair import registry
from lorafair.aggregate import fedit
from lorafair.bench import (
    Entry,
    check_update,
    from_adapter,
    from_config,
    library,
    make_clients,
    make_inputs,
    preset,
)
from lorafair.bench.cli import main, register
from lorafair.types import LoRAFactors


def test_llama3_presets_have_the_public_configs_shapes() -> None:
    s8 = preset("llama3_8b")
    assert len(s8.layers) == s8.full_layers == 224
    shapes8 = {n.rsplit(".", 1)[-1]: (o, i) for n, o, i in s8.layers[:7]}
    assert shapes8 == {
        "q_proj": (4096, 4096),
        "k_proj": (1024, 4096),
        "v_proj": (1024, 4096),
        "o_proj": (4096, 4096),
        "gate_proj": (14336, 4096),
        "up_proj": (14336, 4096),
        "down_proj": (4096, 14336),
    }
    s70 = preset("llama3_70b", blocks=2)
    assert (len(s70.layers), s70.full_layers) == (14, 560)
    assert {(o, i) for _, o, i in s70.layers} == {
        (8192, 8192),
        (1024, 8192),
        (28672, 8192),
        (8192, 28672),
    }


def _tiny_llama_config() -> object:
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )


def test_from_config_matches_the_built_model(tmp_path: pathlib.Path) -> None:
    cfg = _tiny_llama_config()
    cfg.save_pretrained(tmp_path)  # type: ignore[attr-defined]
    qv = from_config(str(tmp_path), ["q_proj", "v_proj"])
    assert [(n.rsplit(".", 1)[-1], o, i) for n, o, i in qv.layers] == [
        ("q_proj", 32, 32),
        ("v_proj", 16, 32),
    ] * 3
    every = from_config(str(tmp_path / "config.json"), ["all-linear"], blocks=1)
    assert len(every.layers) == 7
    assert every.full_layers == 21
    assert not any("lm_head" in n for n, _, _ in every.layers)
    with pytest.raises(ValueError, match="no linear layer"):
        from_config(cfg, ["nope"])
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        from_config(str(tmp_path / "nowhere"), ["q_proj"])


# peft 0.21 calls a transformers 5 property that warns of its own deprecation
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_from_adapter_reads_shapes_rank_and_dtype_of_a_peft_folder(tmp_path: pathlib.Path) -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_tiny_llama_config()).to(torch.bfloat16)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    peft.get_peft_model(model, lora, autocast_adapter_dtype=False).save_pretrained(tmp_path)
    shapes, rank, dtype = from_adapter(str(tmp_path))
    assert rank == 4
    assert dtype == torch.bfloat16
    assert sorted((n, o, i) for n, o, i in shapes.layers) == sorted(
        [(f"model.layers.{b}.self_attn.q_proj", 32, 32) for b in range(3)]
        + [(f"model.layers.{b}.mlp.down_proj", 32, 48) for b in range(3)]
    )


def test_library_entries_are_the_registry() -> None:
    assert tuple(e.name for e in library()) == registry.names()


def test_check_catches_a_biased_result_passed_off_as_an_exact_one() -> None:
    flora = next(e for e in library() if e.exact and not e.shared_A)
    clients = make_clients(preset("tiny").layers, 3, 2, dtype=torch.float64)
    q = check_update(flora, fedit(clients), clients, torch.float64)
    assert q.problems
    assert "must be exact" in q.problems[0]
    assert q.cos_min < 1.0


@pytest.mark.parametrize(
    "entry",
    [e for e in library() if e.reference is not None or e.form is not None],
    ids=lambda e: e.name,
)
def test_check_compares_with_the_registry_reference(entry: Entry) -> None:
    # (2A, B/2) keeps the product, hence the cosine and exactness: only the registry's
    # reference or form can tell it from the right result.
    inputs = make_inputs(preset("tiny"), 3, 3, "float64", "cpu", seed=0)
    clients = inputs.shared if entry.shared_A else inputs.free
    right, _ = entry.run(inputs, {}, None)
    assert check_update(entry, right, clients, torch.float64).problems == []
    wrong = {n: LoRAFactors(f.A * 2, f.B / 2) for n, f in right.items()}
    problems = check_update(entry, wrong, clients, torch.float64).problems
    assert any("differs from" in p for p in problems), problems


def test_command_times_every_method_and_writes_checked_rows(tmp_path: pathlib.Path) -> None:
    argv = ["--preset", "tiny", "-K", "3", "-r", "2", "--repeats", "1", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [w["aggregator"] for w in rows] == list(registry.names())
    assert all(w["check"] == "ok" and w["floor_memory_s"] > 0 for w in rows)
    assert "| fedit |" in (tmp_path / "results.md").read_text()


def test_command_extrapolates_a_subset_of_blocks_and_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--preset", "vit_b16", "--blocks", "1", "-K", "2", "-r", "2", "--repeats", "1"]
    assert main([*argv, "--methods", registry.names()[0], "--no-progress"]) == 0
    assert "48 layers ≈" in capsys.readouterr().out


def test_command_bad_input_is_one_line_and_exit_2(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--adapter", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "adapter_config.json" in err
    assert "Traceback" not in err
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"truncated")
    assert main(["--adapter", str(tmp_path)]) == 2
    assert "adapter_model.safetensors" in capsys.readouterr().err
    assert main(["--preset", "tiny", "--adapter", str(tmp_path)]) == 2


def test_register_adds_the_bench_subcommand() -> None:
    parser = argparse.ArgumentParser(prog="lorafair")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--preset", "tiny", "-K", "2"])
    assert args.command == "bench"
    assert callable(args.run)
    assert args.clients == [2]


def test_command_passes_an_option_to_the_methods_that_take_it(tmp_path: pathlib.Path) -> None:
    argv = ["--preset", "tiny", "-K", "3", "-r", "2", "--dtype", "float64", "--repeats", "1"]
    cos = {}
    for lam in ("0", "1000"):
        out = tmp_path / lam
        methods = ["--methods", "fedit", "lora_fair", "--no-progress", "--out", str(out)]
        assert main([*argv, *methods, "--option", f"lam={lam}"]) == 0
        rows = json.loads((out / "results.json").read_text())["rows"]
        cos[lam] = {w["aggregator"]: w["cos_mean"] for w in rows}
    # λ = 1000 keeps ΔB = 0 (FedIT's cosine), λ = 0 turns B̄Ā towards ΔW
    assert cos["1000"]["lora_fair"] == pytest.approx(cos["1000"]["fedit"], abs=1e-12)
    assert cos["0"]["lora_fair"] > cos["0"]["fedit"] + 1e-3


def test_command_refuses_an_option_no_method_takes(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--preset", "tiny", "--methods", "fedit", "--no-progress"]
    assert main([*argv, "--option", "lam=0.1"]) == 2
    assert main(["--preset", "tiny", "--methods", "lora_fair", "--option", "lam=x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2
    assert "fedit" in err
    assert "lam" in err
    assert "Traceback" not in err
