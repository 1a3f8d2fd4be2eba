"""The SPMA claims at the sizes the issue names, through the functions scripts/spma_compare.py uses (slow: the deep part
is 18 recipe runs, about 15 minutes on 2 cores); each test writes nothing outside its tmp folder."""
import pytest

from scripts import spma_compare as compare

pytestmark = pytest.mark.slow


def test_tabular_and_loglinear_claims():
    verdict = compare.checks(compare.tabular(), compare.loglinear(), [])
    assert all(verdict.values()), verdict


def test_deep_spma_is_within_one_std_of_ppo_or_better_on_every_environment(tmp_path):
    jobs = [(env, loss, seed) for env in compare.ENV_RECIPE for loss in ("spma", "ppo") for seed in (0, 1, 2)]
    rows = compare.summarise(compare.run_all(jobs, tmp_path, workers=2))
    verdict = compare.checks({}, {}, rows)
    assert len(verdict) == 3 and all(verdict.values()), (verdict, [(r["env"], r["loss"], r["finals"]) for r in rows])
