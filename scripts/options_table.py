"""The README's option tables, generated from the config tree: one markdown table per config group of
`scaletrain/conf/<group>/*.yaml` (nested groups such as `model/attention` included), each option with the first
sentence of its file's header comment; models also with their shape and parameter count (the model built on the
meta device, as `scaletrain-run model=<option>` composes it), data options with their sources, recipes with how
they run. The default option of each group comes from config.yaml's defaults list.

    python scripts/options_table.py          # rewrite README.md between its options markers
    python scripts/options_table.py --check  # exit 1 when README.md is stale (tests/test_docs.py does this too)

Only the package's own tree is read (no SCALETRAIN_CONFIG_PATH folders or plugins), and in `local` only the
committed example (a machine's own default.yaml is git-ignored), so the output is the same on every machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CONF = REPO / "scaletrain" / "conf"
BEGIN, END = "<!-- options:begin -->", "<!-- options:end -->"
COMMAND = "python scripts/options_table.py"
# the README's reading order of the top-level groups (a nested group such as model/attention follows its parent);
# a group not named here comes last, alphabetically
ORDER = ("model", "moe", "optim", "data", "train", "logging", "cluster", "experiment", "local", "debug")
NOTE = {
    "model": "parameters of the model `scaletrain-run model=<option>` builds (vocabulary: `model.vocab_size`, else "
    "the default tokenizer's); with MoE, total / active per token",
    "local": "machine settings: copy `example` to `local/default.yaml` (git-ignored); `~local` turns it off",
}


def groups() -> list[str]:
    """Every folder of the tree holding option files, as Hydra names the group (`model/attention`)."""
    found = {p.parent.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml") if p.parent != CONF}
    top = {name: i for i, name in enumerate(ORDER)}
    return sorted(found, key=lambda group: (top.get(group.split("/")[0], len(ORDER)), group))


def options(group: str) -> list[str]:
    names = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    return ["example"] if group == "local" else names


def defaults() -> dict[str, str]:
    """group -> the option config.yaml picks (groups it leaves out or sets to null have none)."""
    out = {}
    for entry in yaml.safe_load((CONF / "config.yaml").read_text())["defaults"]:
        if isinstance(entry, dict):
            ((key, value),) = entry.items()
            if value is not None:
                out[key.removeprefix("optional ").removeprefix("override ")] = str(value)
    return out


def first_sentence(path: Path) -> str:
    """The header comment's first paragraph (up to a blank comment line or an indented command example), cut
    after its first sentence: a '.' or '?' outside brackets followed by a capital letter, or the end."""
    words = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        body = line[1:]
        if body.strip().startswith("@package"):
            continue
        if not body.strip() or body.startswith("   "):
            if words:
                break
            continue
        words.append(body.strip())
    text, depth = " ".join(words), 0
    for i, ch in enumerate(text):
        depth += (ch in "([{") - (ch in ")]}")
        after = text[i + 1 : i + 3]
        if ch in ".?" and depth == 0 and after[:1] == " " and after[1:].isupper():
            return text[: i + 1]
    return text


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _compose(overrides: list[str]):
    from scaletrain.compose import compose

    return compose([*overrides, "~local"])  # never this machine's settings


def model_facts(option: str) -> list[str]:
    from scaletrain.config import load_config
    from scaletrain.sizing import meta_model

    cfg = load_config(_compose([f"model={option}"]))
    m, model = cfg.model, meta_model(cfg)
    counts = model.param_counts()
    heads = f"{m.n_heads}/{m.n_kv_heads}" if m.n_kv_heads and m.n_kv_heads != m.n_heads else str(m.n_heads)
    moe = "–"
    if cfg.moe is not None and cfg.moe.n_experts:
        shared = f" + {cfg.moe.n_shared} shared" if cfg.moe.n_shared else ""
        moe = f"top-{cfg.moe.top_k} of {cfg.moe.n_experts} × {cfg.moe.d_expert or m.d_ff}{shared}"
    params = _count(counts["total"])
    if counts["active"] != counts["total"]:
        params += f" / {_count(counts['active'])}"
    return [f"{m.d_model} × {m.n_layers}", heads, str(m.d_ff), moe, str(model.tok_emb.num_embeddings), params]


def data_facts(option: str) -> list[str]:
    sources = _compose([f"data={option}"]).data.sources
    return [", ".join(f"`{name}` ({source.kind})" for name, source in sources.items())]


def experiment_facts(option: str) -> list[str]:
    recipe = yaml.safe_load((CONF / "experiment" / f"{option}.yaml").read_text())
    grid = ((recipe.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    if recipe.get("study"):
        return [f"study of {', '.join(recipe['study']['arms'])}: `python -m scaletrain.study experiment={option}`"]
    if grid:
        return [f"sweep over {', '.join(grid)}: `scaletrain-run -m experiment={option}`"]
    return [f"one run: `scaletrain-run experiment={option}`"]


FACTS = {  # group -> (column names, option -> cells)
    "model": (["d_model × layers", "heads (q/kv)", "d_ff", "MoE experts", "vocab", "parameters"], model_facts),
    "data": (["sources"], data_facts),
    "experiment": (["runs as"], experiment_facts),
}


def table(group: str, default: str | None) -> list[str]:
    """The group's table under a bold title; models ordered by size, the other groups by name."""
    columns, facts = FACTS.get(group, ([], None))
    rows = [[f"`{option}`", *(facts(option) if facts else [])] for option in options(group)]
    if group == "model":
        rows.sort(key=lambda row: _size(row[-1]))
    for row in rows:
        option = row[0].strip("`")
        row.append(first_sentence(CONF / group / f"{option}.yaml"))
        row[0] += " (default)" if option == default else ""
    lines = [f"**`{group}=`**" + (f": {NOTE[group]}" if group in NOTE else ""), ""]
    lines += ["| " + " | ".join(["option", *columns, "what"]) + " |", "|" + "---|" * (len(columns) + 2)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def _size(params: str) -> float:
    """'57.9M / 20.2M' -> 57.9e6: the total, as `_count` printed it."""
    total = params.split(" / ")[0]
    return float(total[:-1]) * {"M": 1e6, "B": 1e9}[total[-1]]


def render() -> str:
    """The README's options section, markers included."""
    chosen = defaults()
    lines = [BEGIN, f"<!-- generated by `{COMMAND}` from scaletrain/conf; tests/test_docs.py checks it -->"]
    for group in groups():
        lines += ["", *table(group, chosen.get(group))]
    return "\n".join([*lines, END])


def section(text: str) -> str:
    """The options section of a README's text, markers included."""
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{README}: no '{BEGIN}' ... '{END}' lines to write the option tables between")
    return BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md's tables are stale")
    args = parser.parse_args(argv)
    text, fresh = README.read_text(), render()
    if section(text) == fresh:
        return 0
    if args.check:
        print(f"README.md's option tables are stale: run `{COMMAND}`", file=sys.stderr)
        return 1
    README.write_text(text.replace(section(text), fresh))
    print(f"wrote the option tables of {len(groups())} groups into {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
