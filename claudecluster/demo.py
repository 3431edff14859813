"""``claudecluster demo``: a real goal, end to end, with a scripted model instead of the API.

It writes a small Python project with tests into a new directory, starts the built-in
scripted Anthropic API (:mod:`claudecluster.testing`) on loopback, and runs a real goal: the
real Claude Code CLI plans it (structured output), five workers edit the code in their own
worktrees (two of them after their dependency), the branches are merged and the tests run on
the integration branch. Only the model's answers are canned; everything else is the product.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from claudecluster.testing import Script, ScriptedModelServer, structured, text, tool_use

DEMO_GOAL = "Document the inventory package, refactor its rounding, and cover pricing with tests"

SAMPLE_PROJECT: dict[str, str] = {
    "README.md": "# Inventory\n\nA tiny inventory library.\n",
    "inventory/__init__.py": (
        "from inventory.pricing import apply_discount, total_price\n"
        "from inventory.stock import Stock\n\n"
        '__all__ = ["Stock", "apply_discount", "total_price"]\n'
    ),
    "inventory/stock.py": (
        "class Stock:\n"
        "    def __init__(self):\n"
        "        self._items = {}\n\n"
        "    def add(self, name, quantity=1):\n"
        "        if quantity <= 0:\n"
        '            raise ValueError("quantity must be positive")\n'
        "        self._items[name] = self._items.get(name, 0) + quantity\n\n"
        "    def remove(self, name, quantity=1):\n"
        "        have = self._items.get(name, 0)\n"
        "        if quantity > have:\n"
        '            raise ValueError(f"only {have} {name} in stock")\n'
        "        self._items[name] = have - quantity\n\n"
        "    def count(self, name):\n"
        "        return self._items.get(name, 0)\n"
    ),
    "inventory/pricing.py": (
        "def total_price(prices, quantities):\n"
        "    total = 0.0\n"
        "    for name, quantity in quantities.items():\n"
        "        total += prices[name] * quantity\n"
        "    return round(total + 1e-9, 2)\n\n\n"
        "def apply_discount(amount, percent):\n"
        "    if not 0 <= percent <= 100:\n"
        '        raise ValueError("percent must be between 0 and 100")\n'
        "    return round(amount * (100 - percent) / 100 + 1e-9, 2)\n"
    ),
    "tests/test_stock.py": (
        "import pytest\n\n"
        "from inventory import Stock\n\n\n"
        "def test_add_and_count():\n"
        "    stock = Stock()\n"
        '    stock.add("apple", 3)\n'
        '    assert stock.count("apple") == 3\n\n\n'
        "def test_remove_too_many():\n"
        "    stock = Stock()\n"
        '    stock.add("pear")\n'
        "    with pytest.raises(ValueError):\n"
        '        stock.remove("pear", 2)\n'
    ),
    ".gitignore": "__pycache__/\n.pytest_cache/\n",
}

PRICING_TESTS = (
    "import pytest\n\n"
    "from inventory import apply_discount, total_price\n"
    "from inventory.pricing import round_money\n\n\n"
    "def test_round_money():\n"
    "    assert round_money(0.1 + 0.2) == 0.3\n\n\n"
    "def test_total_price():\n"
    '    assert total_price({"apple": 0.5, "pear": 0.25}, {"apple": 3, "pear": 2}) == 2.0\n\n\n'
    "def test_apply_discount():\n"
    "    assert apply_discount(80.0, 25) == 60.0\n\n\n"
    "def test_discount_out_of_range():\n"
    "    with pytest.raises(ValueError):\n"
    "        apply_discount(10.0, 150)\n"
)


def verify_command() -> str:
    """The demo's test command, run with the interpreter ClaudeCluster runs on.

    That interpreter has pytest (a dependency of ClaudeCluster); a bare ``python`` on PATH
    may be another one.
    """
    found = shutil.which("python")
    if found and Path(found).resolve() == Path(sys.executable).resolve():
        return "python -m pytest -q"
    return f"{shlex.quote(sys.executable)} -m pytest -q"


def demo_plan(verify: str) -> dict[str, Any]:
    """The plan the scripted planner answers with (it validates against PLAN_SCHEMA)."""

    def task(
        task_id: str, kind: str, title: str, prompt: str, paths: list[str], deps: list[str]
    ) -> dict[str, Any]:
        return {
            "id": task_id,
            "kind": kind,
            "title": title,
            "prompt": prompt,
            "paths": paths,
            "depends_on": deps,
        }

    return {
        "verify": verify,
        "tasks": [
            task(
                "stock-docs",
                "docs",
                "Document inventory/stock.py",
                "Add a module docstring and a class docstring to inventory/stock.py.",
                ["inventory/stock.py"],
                [],
            ),
            task(
                "pricing-refactor",
                "refactor",
                "Extract round_money in inventory/pricing.py",
                "Both functions in inventory/pricing.py round with `round(x + 1e-9, 2)`. "
                "Extract that into a `round_money(value)` function at the top of the module "
                "and use it in both.",
                ["inventory/pricing.py"],
                [],
            ),
            task(
                "pricing-docs",
                "docs",
                "Document inventory/pricing.py",
                "Add a module docstring and a docstring for round_money to inventory/pricing.py.",
                ["inventory/pricing.py"],
                ["pricing-refactor"],
            ),
            task(
                "pricing-tests",
                "test",
                "Test inventory/pricing.py",
                "Write tests/test_pricing.py covering round_money, total_price and "
                "apply_discount, including an out-of-range discount.",
                ["tests/test_pricing.py"],
                ["pricing-refactor"],
            ),
            task(
                "readme-usage",
                "docs",
                "Usage section in README.md",
                "Add a short Usage section with an example to README.md.",
                ["README.md"],
                [],
            ),
        ],
    }


def _edit(path: str, old: str, new: str) -> Any:
    return tool_use("Edit", {"file_path": path, "old_string": old, "new_string": new})


def demo_scripts(verify: str) -> list[Script]:
    """What the scripted model answers to the planner and to each worker."""
    run_tests = tool_use("Bash", {"command": verify, "description": "Run the tests"})
    return [
        Script(
            name="planner",
            match="Plan this goal",
            turns=[
                tool_use("Glob", {"pattern": "**/*.py"}),
                tool_use("Read", {"file_path": "inventory/pricing.py"}),
                structured(demo_plan(verify)),
                text("The plan has five tasks."),
            ],
        ),
        Script(
            name="stock-docs",
            match="Task stock-docs ",
            turns=[
                tool_use("Read", {"file_path": "inventory/stock.py"}),
                _edit(
                    "inventory/stock.py",
                    "class Stock:\n    def __init__(self):\n",
                    '"""Stock levels of named items."""\n\n\nclass Stock:\n'
                    '    """Counts of items in stock, by name."""\n\n'
                    "    def __init__(self):\n",
                ),
                run_tests,
                text("Documented inventory/stock.py; the tests pass."),
            ],
        ),
        Script(
            name="pricing-refactor",
            match="Task pricing-refactor ",
            turns=[
                tool_use("Read", {"file_path": "inventory/pricing.py"}),
                _edit(
                    "inventory/pricing.py",
                    "def total_price(prices, quantities):\n",
                    "def round_money(value):\n    return round(value + 1e-9, 2)\n\n\n"
                    "def total_price(prices, quantities):\n",
                ),
                _edit("inventory/pricing.py", "round(total + 1e-9, 2)", "round_money(total)"),
                _edit(
                    "inventory/pricing.py",
                    "round(amount * (100 - percent) / 100 + 1e-9, 2)",
                    "round_money(amount * (100 - percent) / 100)",
                ),
                run_tests,
                text("Extracted round_money and used it in both functions."),
            ],
        ),
        Script(
            name="pricing-docs",
            match="Task pricing-docs ",
            turns=[
                tool_use("Read", {"file_path": "inventory/pricing.py"}),
                _edit(
                    "inventory/pricing.py",
                    "def round_money(value):\n",
                    '"""Prices and discounts, rounded to cents."""\n\n\n'
                    "def round_money(value):\n"
                    '    """Round to cents, nudging away from binary float surprises."""\n',
                ),
                run_tests,
                text("Documented inventory/pricing.py."),
            ],
        ),
        Script(
            name="pricing-tests",
            match="Task pricing-tests ",
            turns=[
                tool_use("Read", {"file_path": "inventory/pricing.py"}),
                tool_use("Write", {"file_path": "tests/test_pricing.py", "content": PRICING_TESTS}),
                run_tests,
                text("Added tests/test_pricing.py; all tests pass."),
            ],
        ),
        Script(
            name="readme-usage",
            match="Task readme-usage ",
            turns=[
                tool_use("Read", {"file_path": "README.md"}),
                _edit(
                    "README.md",
                    "A tiny inventory library.\n",
                    "A tiny inventory library.\n\n## Usage\n\n```python\n"
                    "from inventory import Stock, total_price\n\n"
                    'stock = Stock()\nstock.add("apple", 3)\n'
                    'total_price({"apple": 0.5}, {"apple": 3})  # 1.5\n```\n',
                ),
                text("Added a Usage section."),
            ],
        ),
        reviewer_script(),
        responder_script(verify),
    ]


DEMO_REVIEW: dict[str, Any] = {
    "summary": (
        "The change documents the inventory package, extracts round_money from the two "
        "pricing functions, adds tests for pricing and a Usage section to the README. It does "
        "what the tasks set out to do, and the tests pass on the integration branch."
    ),
    "risks": [
        "round_money nudges by +1e-9 before rounding, so negative amounts (refunds) round "
        "toward zero instead of away from it."
    ],
    "notes": [
        {
            "path": "inventory/pricing.py",
            "line": 6,
            "note": "For a negative value the nudge points the wrong way: use "
            "math.copysign(1e-9, value).",
        }
    ],
    "missing_tests": ["round_money with a negative amount"],
}


def reviewer_script() -> Script:
    """The demo's reviewer: reads the changed module, then answers with :data:`DEMO_REVIEW`."""
    return Script(
        name="reviewer",
        match="Review it, then answer with the StructuredOutput tool",
        turns=[
            tool_use("Read", {"file_path": "inventory/pricing.py"}),
            structured(DEMO_REVIEW),
            text("Reviewed."),
        ],
    )


def responder_script(verify: str) -> Script:
    """The demo's answer to a review comment on inventory/pricing.py."""
    return Script(
        name="respond-pricing",
        match="left these comments on inventory/pricing.py",
        turns=[
            tool_use("Read", {"file_path": "inventory/pricing.py"}),
            _edit(
                "inventory/pricing.py",
                "return round(value + 1e-9, 2)",
                "return round(value + (1e-9 if value >= 0 else -1e-9), 2)",
            ),
            tool_use("Bash", {"command": verify, "description": "Run the tests"}),
            text("round_money now nudges away from zero for negative amounts too."),
        ],
    )


def create_sample_project(directory: Path) -> Path:
    """Write the sample project into ``directory`` and commit it; returns the repo path."""
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.iterdir()):
        from claudecluster.errors import UsageError

        raise UsageError(
            f"demo directory {directory} is not empty", hint="Pass --dir a new or empty folder."
        )
    for rel, content in SAMPLE_PROJECT.items():
        target = directory / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    identity = ["-c", "user.name=ClaudeCluster Demo", "-c", "user.email=demo@localhost"]
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "Sample"]):
        subprocess.run(["git", *identity, *args], cwd=directory, check=True)
    return directory


def new_demo_dir() -> Path:
    """A fresh directory for the demo project (kept afterwards, so it can be inspected)."""
    return Path(tempfile.mkdtemp(prefix="claudecluster-demo-"))


class DemoModel:
    """The scripted model server, with this process's sessions pointed at it."""

    def __init__(self, latency_s: float, port: int = 0) -> None:
        verify = verify_command()
        self.verify = verify
        self.server = ScriptedModelServer(demo_scripts(verify), latency_s=latency_s, port=port)
        self._saved: dict[str, str | None] = {}

    def __enter__(self) -> DemoModel:
        self.server.start()
        env = self.server.env()
        self._saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
