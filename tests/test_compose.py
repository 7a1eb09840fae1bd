"""The front door's pieces that stand in for Hydra internals: `compose.sweep_jobs` (the one sweep expansion, for
run.py's preflight and the report's pending jobs) against Hydra's own BasicSweeper, and run.py's command-line
parser against the one `hydra.main` uses. Both compare with Hydra's private code on purpose: scaletrain itself
uses only public Hydra/OmegaConf API, and a Hydra upgrade that changes the order of a sweep's jobs or adds a
flag fails here instead of silently renumbering jobs or misreading a command line."""

from __future__ import annotations

import itertools
import re

import pytest
from hydra import initialize_config_module
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from scaletrain.compose import CONFIG_MODULE, sweep_jobs
from scaletrain.run import hydra_args_parser

from .conftest import REPO


def hydra_sweep(overrides: list[str], recipe_grid: dict[str, str], config_loader=None) -> list[list[str]]:
    """The jobs as Hydra's basic sweeper lists them (BasicSweeper.sweep: its params first, then the command line)."""
    lines = [f"{k}={v}" for k, v in recipe_grid.items()] + overrides
    parsed = OverridesParser.create(config_loader=config_loader).parse_overrides(lines)
    return list(itertools.chain.from_iterable(BasicSweeper.split_arguments(parsed, max_batch_size=None)))


GRIDS = [
    pytest.param(["optim=adamw,muon", "train.seed=1,2,3"], {}, id="group-sweep-by-seeds"),
    pytest.param(["optim.lr=range(1,4)", "model=tiny"], {}, id="int-range"),
    pytest.param(["optim.lr=range(0.001,0.004,0.001)", "train.seed=choice(1,2)"], {}, id="float-range-choice"),
    pytest.param(
        ["experiment=dense_vs_moe", "train.seed=1,2"], {"model": "baseline_10m,moe_8x"}, id="recipe-grid-first"
    ),
    pytest.param(  # a key in both: the command line's values in the recipe's place
        ["train.seed=1,2", "optim=muon", "optim.lr=3e-4,1e-3,3e-3"],
        {"optim.lr": "1e-3,2e-3", "model": "tiny,baseline_10m"},
        id="command-line-wins-in-recipe-position",
    ),
    pytest.param(["a=1", "a=2,3", "b=x"], {}, id="repeated-key-last-wins"),
    pytest.param(
        ["+x=1,2", "x=3", "~y", "++z=choice(a,b)", "g@pkg=o1,o2", "s=[1,2]", "q='a,b'", "d={a:1,b:2}"],
        {"x": "5"},
        id="prefixes-packages-lists-quotes",
    ),
    pytest.param(["model=tiny", "train.seed=4"], {}, id="no-sweep"),
    pytest.param([], {"train.seed": "1,2"}, id="recipe-only"),
    pytest.param([], {}, id="empty"),
]


@pytest.mark.parametrize("overrides,recipe_grid", GRIDS)
def test_sweep_jobs_lists_the_jobs_in_the_order_of_hydras_basic_sweeper(overrides, recipe_grid):
    expected = hydra_sweep(overrides, recipe_grid)
    assert sweep_jobs(overrides, recipe_grid) == expected
    assert len(expected) >= 1


def test_a_group_sweep_varies_the_last_key_fastest_after_the_recipes_keys():
    assert sweep_jobs(["optim=adamw,muon", "train.seed=1,2"], {"model": "tiny,moe_8x"})[:3] == [
        ["model=tiny", "optim=adamw", "train.seed=1"],
        ["model=tiny", "optim=adamw", "train.seed=2"],
        ["model=tiny", "optim=muon", "train.seed=1"],
    ]


def test_a_glob_sweep_lists_the_groups_options_like_hydras_basic_sweeper():
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        overrides = ["model=glob(moe*)", "train.seed=1,2"]
        jobs = sweep_jobs(overrides, {}, config_loader=loader)
        assert jobs == hydra_sweep(overrides, {}, config_loader=loader)
    assert {job[0] for job in jobs} >= {"model=moe_8x", "model=moe_124m_8x"} and len(jobs) % 2 == 0


def test_an_interval_sweep_is_refused_as_hydras_basic_sweeper_refuses_it():
    overrides = ["optim.lr=interval(1e-4,1e-2)"]
    with pytest.raises(HydraException) as hydra_err:
        hydra_sweep(overrides, {})
    with pytest.raises(HydraException, match=re.escape(str(hydra_err.value))):
        sweep_jobs(overrides)


def test_the_command_line_parser_declares_the_flags_of_hydras_own():
    """argparse's usage line lists every flag with its short form, choices and arity, in declaration order."""
    assert hydra_args_parser().format_usage() == get_args_parser().format_usage()


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["-m", "optim.lr=1e-3,inf", "--cfg", "job"],
        ["model=tiny", "-c", "hydra", "-p", "model", "--resolve"],
        ["--info"],
        ["-i", "plugins", "model=tiny"],
        ["--help"],
        ["--hydra-help"],
        ["-sc", "install=bash"],
        ["-cn", "other", "-cp", "/x/conf", "a=1"],
        ["--config-dir", "/tmp/conf", "-r", "a=1", "b=2"],
        ["--experimental-rerun", "run/.hydra/config.pickle"],
        ["--multirun", "a=1,2", "--unknown-flag", "b=3"],
    ],
)
def test_the_command_line_parses_as_hydra_main_parses_it(argv):
    ours, our_rest = hydra_args_parser().parse_known_args(argv)
    theirs, their_rest = get_args_parser().parse_known_args(argv)
    assert (vars(ours), our_rest) == (vars(theirs), their_rest)


def test_scaletrain_uses_no_private_hydra_or_omegaconf_api():
    private = re.compile(r"hydra\._internal|\._get_node\(|get_args_parser|split_arguments")
    hits = [
        f"{path.relative_to(REPO)}:{n}"
        for path in sorted((REPO / "scaletrain").rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert not hits, hits
