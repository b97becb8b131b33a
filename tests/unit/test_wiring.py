"""The wiring is written once, in pipeline/topology.py: stages take their sockets from it and
never name a feed or spell an inbox address by hand."""

import ast
from pathlib import Path

import pytest

from pipeline.topology import STAGES, inbox_address, inbox_file, inbox_taking

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pipeline"
STAGE_FILES = sorted(p for p in (PACKAGE / "stages").glob("*.py") if p.stem in STAGES)
INBOXES = {inbox.name: inbox for wiring in STAGES.values() for inbox in wiring.inboxes}


def docstrings(tree: ast.AST) -> set[int]:
    """ids of the string nodes that are docstrings (they document the wiring, fine)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def stage_names(tree: ast.AST) -> set[int]:
    """ids of the `name = "<stage>"` class attributes: a stage's own name is not a feed."""
    return {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
            and [getattr(t, "id", None) for t in node.targets] == ["name"]}


def strings(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    skip = docstrings(tree) | stage_names(tree)
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in skip]


def spells_an_address(text: str) -> bool:
    return "ipc://" in text or any(inbox_file(name) in text for name in INBOXES)


@pytest.mark.parametrize("path", STAGE_FILES, ids=lambda p: p.stem)
def test_no_stage_names_another_stages_inbox_or_spells_an_address(path):
    own = {inbox.name for inbox in STAGES[path.stem].inboxes}
    by_hand = [(line, text) for line, text in strings(path)
               if (text in INBOXES and text not in own) or spells_an_address(text)]
    assert by_hand == [], f"{path.name}: use io.connect_feeds() / io.connect_requests()"


# The loop makes a stage's sockets from the table; `sluice replay` pushes a recording into a
# running pipeline from the command line. Everything else asks StageIO.
SOCKET_MAKERS = {"loop.py", "topology.py", "replay.py"}
SOCKET_USERS = sorted(p for p in PACKAGE.rglob("*.py") if p.name not in SOCKET_MAKERS)


@pytest.mark.parametrize("path", SOCKET_USERS, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_stage_makes_or_points_a_zeromq_socket_itself(path):
    """Sockets come from StageIO (bind_inboxes, connect_feeds, connect_requests), also for
    the helpers a stage hands them to."""
    tree = ast.parse(path.read_text())
    calls = [(node.lineno, ast.unparse(node.func)) for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and (node.func.attr in ("connect_feed", "_connect_feed")
                  or (node.func.attr == "socket" and "ctx" in ast.unparse(node.func.value)))]
    imports = [alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               for alias in node.names if alias.name in ("inbox_address", "inbox_path")]
    assert (calls, imports) == ([], [])


def test_only_the_topology_spells_an_inbox_address():
    spelled = [(str(path.relative_to(ROOT)), line)
               for path in sorted(PACKAGE.rglob("*.py")) if path.name != "topology.py"
               for line, text in strings(path) if spells_an_address(text)]
    assert spelled == []


@pytest.mark.parametrize("stage", STAGES)
def test_every_link_goes_to_an_inbox_that_takes_what_is_sent(stage):
    wiring = STAGES[stage]
    for link, pattern in [*((f, "pull") for f in wiring.feeds),
                          *((r, "rep") for r in wiring.requests)]:
        inbox = INBOXES[link.inbox]
        assert inbox.pattern == pattern, link
        assert link.kinds and set(link.kinds) <= set(inbox.kinds), link
    kinds = [kind for link in (*wiring.feeds, *wiring.requests) for kind in link.kinds]
    assert len(kinds) == len(set(kinds)), "a stage finds each link by the kind it sends"


def test_every_stage_of_the_table_has_its_module():
    assert [p.stem for p in STAGE_FILES] == sorted(STAGES)


def test_an_address_is_the_inbox_file_under_the_run_dir(tmp_path):
    assert inbox_address(tmp_path, "policy-allow") == f"ipc://{tmp_path}/policy-allow.sock"
    assert inbox_taking("raw_events") == "enrich"
