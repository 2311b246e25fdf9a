"""`mlxfam families` and `mlxfam inspect` over every family: the table is generated from the family
definitions, and what it claims agrees with the modules each golden checkpoint builds."""

import dataclasses
from pathlib import Path

import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlxfam_apps.cli import main

import mlxfam
from mlxfam.loader import load_weights, read_config, weight_files
from mlxfam.models import FAMILIES, family_for

GOLDEN = Path(__file__).parents[1] / "data" / "golden"
VARIANTS = sorted(p.name for p in GOLDEN.iterdir() if (p / "golden.npz").is_file())


def test_families_table_has_one_row_per_family_read_from_the_definitions(capsys, monkeypatch):
    assert main(["families"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + len(FAMILIES)
    for family, line in zip(FAMILIES, lines[1:], strict=True):
        assert line.startswith(family.name)
        for field in dataclasses.fields(family.traits):
            assert getattr(family.traits, field.name) in line

    first = FAMILIES[0]
    changed = dataclasses.replace(first, traits=dataclasses.replace(first.traits, norm="a norm nobody has"))
    monkeypatch.setattr("mlxfam_apps.cli.FAMILIES", (changed, *FAMILIES[1:]))
    assert main(["families", "--markdown"]) == 0
    markdown = capsys.readouterr().out.splitlines()
    assert markdown[1].startswith("|---|") and "a norm nobody has" in markdown[2]


def test_every_family_has_a_golden_fixture():
    covered = {family_for(read_config(GOLDEN / variant)).name for variant in VARIANTS}
    assert covered == {family.name for family in FAMILIES}


@pytest.mark.parametrize("variant", VARIANTS)
def test_table_claims_match_the_built_model(variant):
    """Biases, norm kind and fused projections in the table agree with the checkpoint and its model."""
    directory = GOLDEN / variant
    traits = family_for(read_config(directory)).traits
    model, _ = mlxfam.load(directory)
    names = [name for name, _ in tree_flatten(model.parameters())]
    if traits.biases == "none":
        assert not any(name.endswith(".bias") for name in names)
    uses_layer_norm = any(isinstance(m, nn.LayerNorm) for _, m in model.named_modules())
    assert uses_layer_norm == ("LayerNorm" in traits.norm)
    checkpoint = load_weights(weight_files(directory))
    if traits.fused_qkv == "no":
        assert any("q_proj" in name for name in checkpoint)


@pytest.mark.parametrize("variant", VARIANTS)
def test_inspect_prints_every_family(variant, capsys):
    assert main(["inspect", str(GOLDEN / variant)]) == 0
    out = capsys.readouterr().out
    model, _ = mlxfam.load(GOLDEN / variant)
    assert out.startswith(type(model).__name__)
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert f"parameters: {total:,}" in out
    assert "tokenizer: none" in out
