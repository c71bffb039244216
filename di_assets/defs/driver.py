"""Drive the sensor, the observation job and declarative automation in this process.

This is what the Dagster daemon does for `dagster dev`, one step at a time: `di-assets update`
uses it to rerun only what changed, and the tests and benchmarks use it to watch exactly
which partitions automation requests.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import dagster as dg

from .class_images import class_folders_sensor
from .instance import run_tags
from .partitions import CLASSES

ORDER = ["class_token", "encoder_root", "counterfactuals", "clip_scores", "baseline_counterfactuals",
         "baseline_scores", "scores_db"]
# then the diagnosis: each classifier's predictions (named "<prefix>/<classifier>"), then its report
DIAGNOSIS_ORDER = ["real_predictions", "predictions", "diagnosis"]
# The most partitions one run materializes. Small enough that Dagster's records of a run stay small:
# at its start a run stores one planned row per partition of each partitioned check, and each row holds
# the run's whole partition list, so a run's records grow with its partitions squared (a run of 2,400
# class x shift partitions left 250 MB in the instance). Large enough that a run's start-up is paid
# rarely; the models stay loaded across the runs of one process. 48 = two classes of 24 shifts.
RUN_PARTITIONS = 48


def _runs_of(indices: list[int], most: int) -> list[tuple[int, int]]:
    """Sorted indices as (first, last) runs of consecutive ones, each at most `most` long."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1 and i - runs[-1][0] < most:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def asset_order(defs: dg.Definitions) -> list[str]:
    """Every materializable asset of `defs`, upstream first, as user strings (`predictions/judge`)."""
    names = [k.to_user_string() for k in defs.resolve_asset_graph().materializable_asset_keys]
    rank = {n: i for i, n in enumerate(ORDER + DIAGNOSIS_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n.split("/")[0], len(rank)), n))


@contextlib.contextmanager
def dynamic_partitions_read_once(instance: dg.DagsterInstance) -> Iterator[None]:
    """Within the block, `instance` reads each dynamic partition set from its storage once.

    `evaluate_automation_conditions` builds its cursor against the instance itself (the daemon uses
    a caching queryer), and every partition subset it stores asks for all the class keys again: about
    1,450 queries a tick, each returning every class (1.3 s a tick at 1,000 classes). Within one
    tick the keys cannot change: only the sensor adds classes, between ticks."""
    read, memo = instance.get_dynamic_partitions, {}

    def once(partitions_def_name: str) -> list[str]:
        if partitions_def_name not in memo:
            memo[partitions_def_name] = list(read(partitions_def_name))
        return list(memo[partitions_def_name])  # a copy: no caller can change what the next one gets

    instance.get_dynamic_partitions = once  # this object only, for this block only
    try:
        yield
    finally:
        del instance.get_dynamic_partitions


class LocalDriver:
    def __init__(self, defs: dg.Definitions, instance: dg.DagsterInstance, run_config: dict | None = None,
                 tags: dict | None = None):
        self.defs, self.instance, self.run_config, self.tags = defs, instance, run_config, tags or {}
        self.job = defs.resolve_implicit_global_asset_job_def()
        self.cursor = None
        self.runs = 0
        self.order = asset_order(defs)
        # The evaluator logs every asset at DEBUG on its own handler; keep the console for results.
        logging.getLogger("dagster.automation_condition_tester").setLevel(logging.WARNING)

    def sensor(self, run: bool = True, cursor: str | None = None) -> dg.SensorResult:
        """Evaluate class_folders_sensor from `cursor` (the daemon's: the last tick's) and apply what it
        returns, in the daemon's order (with `run=False`, its events and partition requests only, not
        the runs it asks for)."""
        ctx = dg.build_sensor_context(instance=self.instance, cursor=cursor,
                                      resources={"storage": self.defs.resources["storage"]})
        result = class_folders_sensor(ctx)
        for event in result.asset_events:
            self.instance.report_runless_asset_event(event)
        for req in result.dynamic_partitions_requests:
            if isinstance(req, dg.AddDynamicPartitionsRequest):
                self.instance.add_dynamic_partitions(CLASSES.name, list(req.partition_keys))
            else:
                for key in req.partition_keys:
                    self.instance.delete_dynamic_partition(CLASSES.name, key)
        for request in result.run_requests if run else []:
            self.materialize([k.to_user_string() for k in request.asset_selection])
        return result

    def observe(self) -> None:
        """What the schedule runs: record each class folder's content hash."""
        self.defs.resolve_job_def("observe_class_images").execute_in_process(
            instance=self.instance, run_config=self.run_config, tags={**run_tags(), **self.tags})

    def materialize(self, selection: list[str], partition_key=None, tags=None):
        res = self.job.execute_in_process(instance=self.instance, partition_key=partition_key,
                                          tags={**run_tags(), **self.tags, **(tags or {})},
                                          run_config=self.run_config,
                                          asset_selection=[dg.AssetKey.from_user_string(s) for s in selection])
        self.runs += 1
        return res

    def tick(self) -> dict[str, set]:
        """One evaluation of every asset's automation condition: what it requests now."""
        with dynamic_partitions_read_once(self.instance):
            result = dg.evaluate_automation_conditions(defs=self.defs, instance=self.instance, cursor=self.cursor)
        self.cursor = result.cursor
        keys = {name: dg.AssetKey.from_user_string(name) for name in self.order}
        return {name: set(result.get_requested_partitions(key)) for name, key in keys.items()
                if result.get_num_requested(key)}

    def execute(self, requested: dict[str, set]) -> None:
        """Run what a tick requested, upstream first, as the daemon would: assets requested for the
        same partitions share a run, and consecutive partitions run as one range."""
        groups: list[tuple[list[str], set]] = []
        for name in self.order:
            keys = requested.get(name)
            if not keys:
                continue
            if groups and groups[-1][1] == keys and self._same_partitions(groups[-1][0][0], name):
                groups[-1][0].append(name)
            else:
                groups.append(([name], keys))
        for names, keys in groups:
            if keys == {None}:
                self.materialize(names)
                continue
            for first, last in self.ranges(names[0], keys):
                if first == last:
                    self.materialize(names, partition_key=first)
                else:
                    self.materialize(names, tags={"dagster/asset_partition_range_start": first,
                                                  "dagster/asset_partition_range_end": last})

    def _def(self, name: str) -> dg.AssetsDefinition:
        return self.defs.resolve_assets_def(dg.AssetKey.from_user_string(name))

    def _same_partitions(self, a: str, b: str) -> bool:
        return self._def(a).partitions_def == self._def(b).partitions_def

    def ranges(self, name: str, keys: set) -> list[tuple[str, str]]:
        """Split requested keys into ranges, each one run (its models load once).

        Class x shift keys form rectangles (Dagster reads a multi-partition range as classes
        first..last x shifts first..last): consecutive classes that want the same consecutive
        shifts share one, up to RUN_PARTITIONS partitions. Keys are looked up in dicts: a tick
        may request every partition of a thousand classes.
        """
        pdef = self._def(name).partitions_def
        if isinstance(pdef, dg.MultiPartitionsDefinition):
            return self._rectangles(pdef, keys)
        order = [str(k) for k in pdef.get_partition_keys(dynamic_partitions_store=self.instance)]
        at = {k: i for i, k in enumerate(order)}
        return [(order[lo], order[hi]) for lo, hi in _runs_of(sorted(at[str(k)] for k in keys), RUN_PARTITIONS)]

    def range_size(self, name: str, first: str, last: str) -> int:
        """How many partitions of `name` a range holds (a rectangle for class x shift keys)."""
        pdef = self._def(name).partitions_def
        if isinstance(pdef, dg.MultiPartitionsDefinition):
            shifts = list({d.name: d.partitions_def for d in pdef.partitions_defs}["shift"].get_partition_keys())
            classes = list(self.instance.get_dynamic_partitions(CLASSES.name))
            (c0, s0), (c1, s1) = first.split("|"), last.split("|")
            return (classes.index(c1) - classes.index(c0) + 1) * (shifts.index(s1) - shifts.index(s0) + 1)
        order = [str(k) for k in pdef.get_partition_keys(dynamic_partitions_store=self.instance)]
        return order.index(last) - order.index(first) + 1

    def _rectangles(self, pdef: dg.MultiPartitionsDefinition, keys: set) -> list[tuple[str, str]]:
        dims = {d.name: d.partitions_def for d in pdef.partitions_defs}
        classes = list(self.instance.get_dynamic_partitions(CLASSES.name))
        shifts = list(dims["shift"].get_partition_keys())
        class_at, shift_at = {k: i for i, k in enumerate(classes)}, {k: i for i, k in enumerate(shifts)}
        wanted: dict[int, list[int]] = {}
        for key in keys:
            c, s = str(key).split("|")
            wanted.setdefault(class_at[c], []).append(shift_at[s])
        # each class's shift runs; then consecutive classes with the same runs merge into rectangles
        rows = [(ci, tuple(_runs_of(sorted(si), len(shifts)))) for ci, si in sorted(wanted.items())]
        out, block = [], []
        per_class = lambda runs: sum(hi - lo + 1 for lo, hi in runs)  # noqa: E731
        for ci, runs in rows + [(None, ())]:
            if block and (ci is None or ci != block[-1][0] + 1 or runs != block[-1][1]
                          or (len(block) + 1) * per_class(runs) > RUN_PARTITIONS):
                first, last, shift_runs = block[0][0], block[-1][0], block[0][1]
                out += [(f"{classes[first]}|{shifts[lo]}", f"{classes[last]}|{shifts[hi]}") for lo, hi in shift_runs]
                block = []
            if ci is not None:
                block.append((ci, runs))
        return out

    def settle(self, max_ticks: int = 10) -> dict[str, set]:
        """Tick and execute until automation requests nothing more; return all it requested."""
        seen: dict[str, set] = {}
        for _ in range(max_ticks):
            requested = self.tick()
            if not requested:
                return seen
            self.execute(requested)
            for k, v in requested.items():
                seen.setdefault(k, set()).update(str(x) if x is not None else None for x in v)
        raise RuntimeError(f"automation still requests work after {max_ticks} ticks: {seen}")
