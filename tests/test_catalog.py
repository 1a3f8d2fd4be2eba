"""``python -m recipes ls``: every shipped recipe is in the catalog with its method, paper, role and size."""
import json
import re
import subprocess
import sys

import pytest

from recipes.catalog import CATALOG, PAPERS, RECIPE_DIR, ROLES, SIZES, ls, recipes
from tests.helpers import ROOT


def test_every_recipe_has_one_entry_and_every_entry_a_recipe():
    shipped = {p.stem for p in RECIPE_DIR.glob("*.yaml")}
    assert shipped == set(CATALOG)
    listed = recipes()
    assert sorted(r.name for r in listed) == sorted(shipped)
    for r in listed:
        assert CATALOG[r.name].method in PAPERS and r.role in ROLES and r.size in SIZES, r
        assert 10 < len(r.shows) <= 160 and r.paper and r.method, r


def test_a_recipe_without_an_entry_is_named(monkeypatch):
    from recipes import catalog

    monkeypatch.setattr(catalog, "CATALOG", {k: v for k, v in CATALOG.items() if k != "fox_lm"})
    with pytest.raises(KeyError, match="fox_lm"):
        recipes()


@pytest.mark.parametrize("recipe", sorted(CATALOG))
def test_size_agrees_with_the_config(recipe):
    """A recipe whose config asks for a GPU (accelerator, FSDP, a second GPU for its actor) is listed GPU-sized;
    a CPU-sized recipe asks for none."""
    text = (RECIPE_DIR / f"{recipe}.yaml").read_text()
    config = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    wants_gpu = bool(re.search(r"accelerator: (gpu|cuda)|BlockFSDP|actor_device: cuda", config))
    if wants_gpu:
        assert CATALOG[recipe].size == "gpu"
    if CATALOG[recipe].size == "cpu":
        assert not wants_gpu and "precision: bf16" not in config


def test_ls_json_in_a_real_process_lists_every_recipe():
    proc = subprocess.run([sys.executable, "-m", "recipes", "ls", "--json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["name"] for r in rows] == [r.name for r in recipes()]
    fox = next(r for r in rows if r["name"] == "fox_125m")
    assert fox["size"] == "gpu" and "Forgetting Transformer" in fox["paper"] and fox["path"] == "recipes/fox_125m.yaml"
    assert {"name", "path", "method", "paper", "role", "size", "shows"} == set(fox)


def test_ls_table_and_size_filter(capsys):
    assert ls(["--size", "gpu"]) == 0
    out = capsys.readouterr().out
    gpu = [r.name for r in recipes() if r.size == "gpu"]
    assert all(f"  {name} " in out for name in gpu) and "  fox_lm " not in out
    assert f"{len(gpu)} recipes" in out and "Lin et al." in out


@pytest.mark.parametrize("argv, needle", [(["--size", "tpu"], "invalid choice: 'tpu'"),
                                          (["--jsn"], "unrecognized arguments: --jsn")])
def test_ls_bad_input_is_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        ls(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
