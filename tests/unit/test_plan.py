"""Plans: file loading, validation, path checks, overlap, ordering and dumping."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from claudecluster.errors import PathEscapeError, PlanError, UsageError
from claudecluster.models import TaskSpec
from claudecluster.plan import (
    MAX_PLAN_FILE_BYTES,
    Plan,
    check_path,
    dump_plan,
    find_cycle,
    load_plan_file,
    parse_plan,
    paths_overlap,
    topological_order,
    validate_plan,
)


def task(task_id: str, *depends_on: str, paths: list[str] | None = None) -> dict[str, Any]:
    """A plan-file task entry."""
    return {
        "id": task_id,
        "title": f"Task {task_id}",
        "prompt": f"Do {task_id}",
        "paths": paths or [],
        "depends_on": list(depends_on),
    }


def make_plan(*tasks: dict[str, Any]) -> Plan:
    return Plan.model_validate({"tasks": list(tasks)})


def write(tmp_path: Path, content: str, name: str = "plan.yaml") -> Path:
    path = tmp_path / name
    path.write_text(content)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A directory standing in for the repository root."""
    repo = tmp_path / "repo"
    (repo / "src" / "pkg").mkdir(parents=True)
    (repo / "src" / "pkg" / "mod.py").write_text("x = 1\n")
    return repo


class TestLoadPlanFile:
    """Reading a plan file: every way it can be broken is a PlanError naming the file."""

    def test_valid_yaml(self, tmp_path: Path) -> None:
        content = yaml.safe_dump(
            {"goal": "G", "verify": "pytest", "tasks": [task("a"), task("b", "a")]}
        )

        plan = load_plan_file(write(tmp_path, content))

        assert plan.goal == "G" and plan.verify == "pytest"
        assert [t.id for t in plan.tasks] == ["a", "b"]
        assert plan.tasks[1].depends_on == ["a"]
        assert plan.tasks[0].kind == "other"

    def test_valid_json(self, tmp_path: Path) -> None:
        content = json.dumps({"tasks": [task("a", paths=["x.py"])]})

        plan = load_plan_file(write(tmp_path, content, "plan.json"))

        assert [t.id for t in plan.tasks] == ["a"] and plan.tasks[0].paths == ["x.py"]

    def test_missing_file(self, tmp_path: Path) -> None:
        missing = tmp_path / "nope.yaml"

        with pytest.raises(PlanError, match="does not exist") as caught:
            load_plan_file(missing)

        assert caught.value.source == str(missing)
        assert isinstance(caught.value, UsageError)  # exit code 2 in the CLI

    def test_directory_is_not_a_plan_file(self, tmp_path: Path) -> None:
        with pytest.raises(PlanError, match="does not exist"):
            load_plan_file(tmp_path)

    @pytest.mark.parametrize("content", ["", "   \n\n\t\n"])
    def test_empty_file(self, tmp_path: Path, content: str) -> None:
        with pytest.raises(PlanError, match="is empty"):
            load_plan_file(write(tmp_path, content))

    def test_only_a_comment(self, tmp_path: Path) -> None:
        with pytest.raises(PlanError, match="is empty"):
            load_plan_file(write(tmp_path, "# nothing here yet\n"))

    def test_invalid_yaml_names_the_line(self, tmp_path: Path) -> None:
        content = "goal: G\ntasks:\n  - id: a\n    title: [unclosed\n"

        with pytest.raises(PlanError, match="not valid YAML or JSON at line") as caught:
            load_plan_file(write(tmp_path, content))

        assert caught.value.hint

    def test_invalid_json(self, tmp_path: Path) -> None:
        with pytest.raises(PlanError, match="not valid YAML or JSON"):
            load_plan_file(write(tmp_path, '{"tasks": [', "plan.json"))

    @pytest.mark.parametrize(
        ("content", "kind"), [("- a\n- b\n", "list"), ("just a string\n", "str"), ("42\n", "int")]
    )
    def test_not_a_mapping(self, tmp_path: Path, content: str, kind: str) -> None:
        with pytest.raises(PlanError, match=f"must be a mapping with a `tasks:` list, not {kind}"):
            load_plan_file(write(tmp_path, content))

    def test_missing_tasks(self, tmp_path: Path) -> None:
        with pytest.raises(PlanError, match="is invalid: tasks: Field required"):
            load_plan_file(write(tmp_path, "goal: G\n"))

    def test_bad_task_id_pattern(self, tmp_path: Path) -> None:
        content = yaml.safe_dump({"tasks": [task("ok"), task("Bad_ID")]})

        with pytest.raises(PlanError, match=r"is invalid: tasks\.1\.id: String should match"):
            load_plan_file(write(tmp_path, content))

    @pytest.mark.parametrize("bad_id", ["-leading-dash", "", "a" * 64, "has space", "ünï"])
    def test_more_bad_ids(self, bad_id: str) -> None:
        with pytest.raises(PlanError, match=r"tasks\.0\.id"):
            parse_plan({"tasks": [task(bad_id)]}, source="test")

    def test_unknown_field_and_kind(self, tmp_path: Path) -> None:
        with pytest.raises(PlanError, match=r"tasks\.0\.colour"):
            parse_plan({"tasks": [task("a") | {"colour": "red"}]}, source="test")
        with pytest.raises(PlanError, match=r"tasks\.0\.kind"):
            parse_plan({"tasks": [task("a") | {"kind": "magic"}]}, source="test")

    def test_counts_further_errors(self) -> None:
        with pytest.raises(PlanError, match=r"\(and 1 more\)"):
            parse_plan({"tasks": [task("A"), task("B")]}, source="test")

    def test_too_large(self, tmp_path: Path) -> None:
        big = "# " + "x" * MAX_PLAN_FILE_BYTES + "\ntasks: []\n"

        with pytest.raises(PlanError, match="larger than 1 MB"):
            load_plan_file(write(tmp_path, big))


class TestValidatePlan:
    """The rules the scheduler relies on."""

    def test_valid_plan_is_returned(self, root: Path) -> None:
        plan = make_plan(task("a"), task("b", "a"), task("c", "a", "b"))

        checked = validate_plan(plan, root)

        assert [t.id for t in checked.tasks] == ["a", "b", "c"]

    def test_duplicate_ids(self, root: Path) -> None:
        with pytest.raises(PlanError, match="duplicate task id 'a'"):
            validate_plan(make_plan(task("a"), task("b"), task("a")), root)

    def test_unknown_dependency(self, root: Path) -> None:
        with pytest.raises(PlanError, match="task 'b' depends on unknown task 'ghost'"):
            validate_plan(make_plan(task("a"), task("b", "ghost")), root)

    def test_self_dependency(self, root: Path) -> None:
        with pytest.raises(PlanError, match="task 'a' depends on itself"):
            validate_plan(make_plan(task("a", "a")), root)

    def test_cycle_message_shows_the_cycle(self, root: Path) -> None:
        plan = make_plan(task("free"), task("a", "c"), task("b", "a"), task("c", "b"), task("d"))

        with pytest.raises(PlanError, match="dependency cycle") as caught:
            validate_plan(plan, root)

        assert caught.value.message == "the plan has a dependency cycle: a -> c -> b -> a"

    def test_cycle_reached_through_a_non_cycle_task(self, root: Path) -> None:
        plan = make_plan(task("entry", "x"), task("x", "y"), task("y", "x"))

        with pytest.raises(PlanError) as caught:
            validate_plan(plan, root)

        assert caught.value.message.endswith("cycle: x -> y -> x")

    def test_find_cycle_none_for_a_dag(self) -> None:
        plan = make_plan(task("a"), task("b", "a"), task("c", "a"), task("d", "b", "c"))

        assert find_cycle(plan.tasks) is None

    def test_reserved_id(self, root: Path) -> None:
        with pytest.raises(PlanError, match="task id 'integration' is reserved"):
            validate_plan(make_plan(task("a"), task("integration")), root)

    def test_too_many_tasks(self, root: Path) -> None:
        plan = make_plan(*(task(f"t{i}") for i in range(4)))

        with pytest.raises(PlanError, match="4 tasks, more than --max-tasks 3"):
            validate_plan(plan, root, max_tasks=3)
        assert validate_plan(plan, root, max_tasks=4) is plan

    def test_zero_tasks(self, root: Path) -> None:
        with pytest.raises(PlanError, match="the plan has no tasks"):
            validate_plan(make_plan(), root)

    def test_zero_tasks_from_a_file(self, root: Path, tmp_path: Path) -> None:
        plan = load_plan_file(write(tmp_path, "tasks: []\n"))

        with pytest.raises(PlanError, match="no tasks"):
            validate_plan(plan, root)

    def test_duplicate_dependencies_are_collapsed(self) -> None:
        spec = TaskSpec.model_validate(task("b", "a", "a", "c", "a"))

        assert spec.depends_on == ["a", "c"]

    def test_paths_are_normalised(self, root: Path) -> None:
        plan = make_plan(task("a", paths=["./src//pkg/mod.py", "src/pkg/", "docs/*.md"]))

        validate_plan(plan, root)

        assert plan.tasks[0].paths == ["src/pkg/mod.py", "src/pkg", "docs/*.md"]

    def test_escaping_path_fails_validation(self, root: Path) -> None:
        with pytest.raises(PathEscapeError, match="leaves the repository"):
            validate_plan(make_plan(task("a", paths=["src/../../x.py"])), root)


class TestCheckPath:
    """Task paths must stay inside the repository."""

    @pytest.mark.parametrize("raw", ["../x.py", "src/../../x.py", "..", "a/b/../../../c"])
    def test_dot_dot(self, root: Path, raw: str) -> None:
        with pytest.raises(PathEscapeError, match="leaves the repository") as caught:
            check_path(root, raw)

        assert caught.value.path == raw

    @pytest.mark.parametrize("raw", ["/etc/passwd", "\\windows\\x", "~/notes.txt", "C:/x.py"])
    def test_absolute(self, root: Path, raw: str) -> None:
        with pytest.raises(PathEscapeError, match="is absolute"):
            check_path(root, raw)

    def test_empty(self, root: Path) -> None:
        with pytest.raises(PathEscapeError, match="empty"):
            check_path(root, "  ")

    def test_symlinked_folder_pointing_outside(self, root: Path, tmp_path: Path) -> None:
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "secret.py").write_text("SECRET = 1\n")
        (root / "vendor").symlink_to(outside, target_is_directory=True)

        with pytest.raises(PathEscapeError, match="through a symlink"):
            check_path(root, "vendor/secret.py")
        # Also when the rest of the path does not exist yet, or is a glob.
        with pytest.raises(PathEscapeError, match="through a symlink"):
            check_path(root, "vendor/new/file.py")
        with pytest.raises(PathEscapeError, match="through a symlink"):
            check_path(root, "vendor/*.py")

    def test_symlinked_file_pointing_outside(self, root: Path, tmp_path: Path) -> None:
        target = tmp_path / "elsewhere.py"
        target.write_text("x = 1\n")
        (root / "link.py").symlink_to(target)

        with pytest.raises(PathEscapeError, match="through a symlink"):
            check_path(root, "link.py")

    def test_symlink_inside_the_repo_is_fine(self, root: Path) -> None:
        (root / "alias").symlink_to(root / "src", target_is_directory=True)

        assert check_path(root, "alias/pkg/mod.py") == "alias/pkg/mod.py"

    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            ("src/pkg/mod.py", "src/pkg/mod.py"),
            ("src/pkg/new_module.py", "src/pkg/new_module.py"),
            ("brand/new/dir/file.py", "brand/new/dir/file.py"),
            ("src/**/*.py", "src/**/*.py"),
            ("./README.md", "README.md"),
        ],
    )
    def test_nested_paths_are_fine(self, root: Path, raw: str, expected: str) -> None:
        assert check_path(root, raw) == expected

    def test_repo_root_given_through_a_symlink(self, root: Path, tmp_path: Path) -> None:
        link = tmp_path / "repo-link"
        link.symlink_to(root, target_is_directory=True)

        assert check_path(link, "src/pkg/mod.py") == "src/pkg/mod.py"


class TestPathsOverlap:
    """Which path lists may touch the same file."""

    @pytest.mark.parametrize(
        ("a", "b"),
        [
            (["calc.py"], ["calc.py"]),
            (["src"], ["src/pkg/mod.py"]),
            (["src/pkg/mod.py"], ["src"]),
            (["src/"], ["src/a.py"]),
            (["src/*.py"], ["src/a.py"]),
            (["src/a.py"], ["src/*.py"]),
            (["src/**"], ["src/deep/er/x.py"]),
            (["docs/a.md", "calc.py"], ["strings.py", "calc.py"]),
            (["*.py"], ["calc.py"]),
            (["."], ["anything/at/all.py"]),
            (["src/mod?.py"], ["src/mod1.py"]),
            # A folder that may hold files the glob matches.
            (["src/**/*.py"], ["src/pkg"]),
        ],
    )
    def test_overlapping(self, a: list[str], b: list[str]) -> None:
        assert paths_overlap(a, b)
        assert paths_overlap(b, a)

    @pytest.mark.parametrize(
        ("a", "b"),
        [
            (["calc.py"], ["strings.py"]),
            (["src"], ["srcs/a.py"]),
            (["src/a.py"], ["src/a.pyc"]),
            (["src/a"], ["src/ab/x.py"]),
            (["src/*.py"], ["tests/a.py"]),
            ([], ["calc.py"]),
            ([], []),
        ],
    )
    def test_disjoint(self, a: list[str], b: list[str]) -> None:
        assert not paths_overlap(a, b)
        assert not paths_overlap(b, a)


class TestTopologicalOrder:
    """Dependencies first; ties keep the plan's order."""

    def test_independent_tasks_keep_plan_order(self) -> None:
        plan = make_plan(task("c"), task("a"), task("b"))

        assert [t.id for t in topological_order(plan)] == ["c", "a", "b"]

    def test_dependencies_first_and_ties_in_plan_order(self) -> None:
        plan = make_plan(task("x", "z"), task("y"), task("z"), task("w", "x", "y"), task("v"))

        assert [t.id for t in topological_order(plan)] == ["y", "z", "v", "x", "w"]

    def test_every_task_after_its_dependencies(self) -> None:
        plan = make_plan(
            task("e", "d"), task("d", "b", "c"), task("c", "a"), task("b", "a"), task("a")
        )

        order = [t.id for t in topological_order(plan)]

        assert order == ["a", "c", "b", "d", "e"]

    def test_cycle_raises(self) -> None:
        with pytest.raises(PlanError, match="cycle"):
            topological_order(make_plan(task("a", "b"), task("b", "a")))


class TestDumpPlan:
    """dump_plan writes the plan-file format: it loads back to the same plan."""

    @pytest.fixture
    def plan(self) -> Plan:
        return Plan.model_validate(
            {
                "goal": "Tidy up: docstrings & tests # not a comment",
                "verify": "python -m pytest -q",
                "pool": "local",
                "tasks": [
                    task("calc-doc", paths=["calc.py"]) | {"kind": "docs", "title": "Doc: calc"},
                    task("tests", "calc-doc", paths=["tests/", "test_*.py"])
                    | {"kind": "test", "verify": "pytest -x", "pool": "gpu"},
                    task("other")
                    | {"prompt": "Line one.\n\n- item: with colon\n'quoted' \"both\"\nÜnïcode ✓"},
                ],
            }
        )

    def test_yaml_round_trip(self, plan: Plan, tmp_path: Path) -> None:
        text = dump_plan(plan)

        loaded = load_plan_file(write(tmp_path, text))

        assert loaded == plan
        assert text.startswith("goal: ")
        assert "pool: gpu" in text
        assert text.count("verify:") == 2  # the plan's and one task's; None is left out

    def test_json_round_trip(self, plan: Plan, tmp_path: Path) -> None:
        text = dump_plan(plan, as_json=True)

        loaded = load_plan_file(write(tmp_path, text, "plan.json"))

        assert loaded == plan
        assert json.loads(text)["tasks"][0]["id"] == "calc-doc"

    def test_round_trip_validates_again(self, plan: Plan, root: Path, tmp_path: Path) -> None:
        loaded = load_plan_file(write(tmp_path, dump_plan(plan)))

        assert validate_plan(loaded, root) == validate_plan(plan.model_copy(deep=True), root)
        assert loaded.tasks[1].paths == ["tests", "test_*.py"]
