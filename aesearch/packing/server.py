"""Pack servers: one process per GPU (or CPU slot) that trains many trials of a search together.

With `resources.pack: N`, a search starts pack servers, each holding `resources.cpu` and
`resources.gpu`, and each of its trials becomes a light member (MEMBER_CPU) that hands its
training to a server through `train_in_pack`, a drop-in for `aesearch.training.trainer.train`. The trial is
still its own Tune trial and its own MLflow run: it reports every epoch to Tune (so ASHA stops
it alone), logs its metrics and pictures, keeps its checkpoints, and a retry or a resumed search
joins a server again from its checkpoint.

A server trains in rounds: each round, every member that asked for its next epoch gets it;
members that share a pack key (one model shape, see `aesearch.packing.fused`) train fused, up to N at
a time, the others one group after another. One process and one CUDA context serve them all, and
its memory is capped at the fraction of the GPU the server holds.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ray
import torch

from aesearch.config import TrainConfig, on_device, parse_config
from aesearch.errors import DivergedError
from aesearch.packing.fused import pack_groups, pack_key, train_group_epoch
from aesearch.parts.data import Data
from aesearch.parts.models import build_model
from aesearch.training.checkpoints import save_checkpoint
from aesearch.training.trainer import EpochEnd, Reporter, Trainer, TrainResult

MEMBER_CPU = 0.05  # what a member trial holds: it only reports, logs and writes checkpoints
GATHER_S = 2.0  # how long a round waits for members still reporting their previous epoch
# A member that has not asked for its next epoch this long after its last one (its trial process
# died without leaving: a lost node, a kill) is dropped: rounds stop waiting for it, its memory is freed.
SILENT_S = 300.0
PACK_METRIC = "pack/members"  # reported each epoch: how many trials trained fused with this one


@dataclass
class EpochReply:
    """A member's epoch, as its server trained it."""

    epoch: int
    metrics: dict[str, float]
    is_best: bool
    state: dict[str, Any]  # the member's checkpoint after this epoch, on the CPU
    diverged: tuple[int, dict[str, float]] | None = None  # (epoch, metrics) instead, when it diverged


def on_cpu(value: Any) -> Any:
    """A checkpoint state with every tensor moved to the CPU (a member may have no GPU)."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: on_cpu(item) for key, item in value.items()}
    if isinstance(value, list):
        return [on_cpu(item) for item in value]
    return value


def gpu_memory_cap(fraction: float) -> None:
    """Cap this process's CUDA memory at the fraction of a GPU it was given: trials that share a
    GPU cannot starve one another (one that outgrows its share fails alone, with an OOM)."""
    if torch.cuda.is_available() and 0 < fraction < 1:
        torch.cuda.set_per_process_memory_fraction(fraction)


@ray.remote
class PackServer:
    def __init__(self, data: Data, pack: int, gpu_fraction: float, silent_s: float = SILENT_S):
        self.device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        gpu_memory_cap(gpu_fraction if self.device.type == "cuda" else 0)
        self.data = data.to(self.device)  # one copy on the device, shared by every member
        self.pack = pack
        self.members: dict[str, Trainer] = {}
        self.waiting: dict[str, asyncio.Future] = {}
        self.silent_s = silent_s
        self.answered: dict[str, float] = {}  # member -> when it joined or last got an epoch
        self.worker = ThreadPoolExecutor(1)  # device work one piece at a time, off the event loop
        self.rounds: asyncio.Task | None = None

    async def _on_device(self, work, *args):
        return await asyncio.get_running_loop().run_in_executor(self.worker, work, *args)

    async def training_device(self) -> str:
        """Where it trains: its members' runtime.device."""
        return str(self.device)

    async def load(self, key: str | None) -> tuple[int, int]:
        """(members of this pack key, all members): for a new member choosing a server."""
        same = sum(1 for trainer in self.members.values() if key is not None and pack_key(trainer.config) == key)
        return same, len(self.members)

    async def join(self, member: str, config: dict[str, Any], state: dict[str, Any] | None) -> None:
        """Start (or, from a checkpoint `state`, continue) a member's training here."""
        parsed = on_device(parse_config(config, source="pack member config"), str(self.device))

        def make() -> Trainer:
            trainer = Trainer(parsed, self.data)
            if state is not None:
                trainer.restore(state)
            return trainer

        self.members[member] = await self._on_device(make)
        self.answered[member] = time.monotonic()

    async def next_epoch(self, member: str) -> EpochReply:
        if member not in self.members:  # dropped as silent, or this server was restarted empty
            raise LookupError(f"trial {member} is no longer a member of this pack server (silent for over "
                              f"{self.silent_s:.0f} s, or the server restarted): its retry joins again")
        future = asyncio.get_running_loop().create_future()
        self.waiting[member] = future
        if self.rounds is None or self.rounds.done():
            self.rounds = asyncio.create_task(self._run_rounds())
        return await future

    async def finish(self, member: str, train_seconds: float) -> TrainResult:
        """The member's result (its best weights evaluated here), on the CPU; it leaves."""
        trainer = self.members.pop(member)
        self.answered.pop(member, None)

        def evaluate() -> TrainResult:
            result = trainer.result(train_seconds)
            result.model = result.model.cpu()
            return result

        return await self._on_device(evaluate)

    async def leave(self, member: str) -> None:
        """A member that ends early (ASHA stopped it, it failed) frees its place."""
        self.members.pop(member, None)
        self.answered.pop(member, None)
        waiting = self.waiting.pop(member, None)
        if waiting is not None and not waiting.done():
            waiting.cancel()

    async def _run_rounds(self) -> None:
        while self.waiting:
            gathering_until = time.monotonic() + GATHER_S
            while not self.waiting.keys() >= self._expected() and time.monotonic() < gathering_until:
                await asyncio.sleep(0.01)
            ready, self.waiting = self.waiting, {}  # who asks from now on waits for the next round
            for group in self._groups([m for m in ready if m in self.members]):
                group = [member for member in group if member in self.members]  # some may have left meanwhile
                if not group:
                    continue
                try:
                    replies = await self._on_device(self._train, [self.members[m] for m in group])
                except Exception as error:  # noqa: BLE001 - e.g. out of memory: these members fail, not the server
                    for member in group:
                        self.members.pop(member, None)
                        if not ready[member].done():
                            ready[member].set_exception(error)
                    continue
                for member, reply in zip(group, replies):
                    self.answered[member] = time.monotonic()
                    if reply.diverged:
                        self.members.pop(member, None)
                    if not ready[member].done():
                        ready[member].set_result(reply)

    def _expected(self) -> set[str]:
        """The members a round waits for; drops those silent for longer than `silent_s`."""
        now = time.monotonic()
        for member in [m for m in self.members if m not in self.waiting and now - self.answered[m] > self.silent_s]:
            print(f"pack server: dropped member {member}, silent for {now - self.answered.pop(member):.0f} s")
            self.members.pop(member)
        return set(self.members)

    def _groups(self, members: list[str]) -> list[list[str]]:
        return pack_groups({member: self.members[member].config for member in members}, self.pack)

    def _train(self, trainers: list[Trainer]) -> list[EpochReply]:
        ends = train_group_epoch(trainers)
        replies = []
        for trainer, end in zip(trainers, ends):
            if isinstance(end, DivergedError):
                replies.append(EpochReply(end.epoch, {}, False, {}, diverged=(end.epoch, end.metrics)))
            else:
                end.metrics[PACK_METRIC] = float(len(trainers))  # in the trainer's history too
                replies.append(EpochReply(end.epoch, end.metrics, end.is_best, on_cpu(trainer.state())))
        return replies


# --- the driver's side ------------------------------------------------------------------------


def server_count(cpu: float, gpu: float, pack: int, trials: int, max_concurrent: int | None) -> int:
    """How many pack servers the cluster holds, each with its `pack` members beside it."""
    available = ray.cluster_resources()
    fits = math.floor(available.get("CPU", 0) / (cpu + MEMBER_CPU * pack) + 1e-9)
    if gpu > 0:
        fits = min(fits, math.floor(available.get("GPU", 0) / gpu + 1e-9))
    wanted = math.ceil(min(trials, max_concurrent or trials) / pack)
    return max(1, min(fits, wanted))  # at least one: a cluster that lacks room may grow (check_resources warned)


def start_servers(data: Data, cpu: float, gpu: float, pack: int, count: int) -> list[Any]:
    data_ref = ray.put(data)
    # A server that dies (its node lost) is started again, empty: its members fail, and Tune's
    # retries join it again from their checkpoints.
    return [
        PackServer.options(num_cpus=cpu, num_gpus=gpu, max_restarts=-1).remote(data_ref, pack, gpu)
        for _ in range(count)
    ]


def stop_servers(servers: list[Any]) -> None:
    for server in servers:
        ray.kill(server)


# --- a member's side --------------------------------------------------------------------------


def choose_server(servers: list[Any], config: TrainConfig, pack: int) -> Any:
    """The server where this trial fuses best: most members of its shape with room left, else
    the least loaded."""
    loads = ray.get([server.load.remote(pack_key(config)) for server in servers])
    best = max(range(len(servers)), key=lambda i: (loads[i][1] < pack and loads[i][0] > 0, -loads[i][1]))
    return servers[best]


def train_in_pack(server: Any, member: str, config: TrainConfig, data: Data, reporter: Reporter | None = None,
                  resume_from: dict[str, Any] | None = None) -> TrainResult:
    """`aesearch.training.trainer.train`, with the training done by a pack server: the reporter receives each
    epoch (with a CPU copy of the model, and its checkpoint) as if trained here."""
    started = time.perf_counter()
    ray.get(server.join.remote(member, config.model_dump(mode="json"), resume_from))
    model = build_model(config.model, data.spec)  # the member's weights, for its pictures
    epoch = resume_from["epoch"] if resume_from is not None else 0
    try:
        while epoch < config.epochs:
            reply: EpochReply = ray.get(server.next_epoch.remote(member))
            if reply.diverged:
                raise DivergedError(*reply.diverged)
            model.load_state_dict(reply.state["model"])
            model.train()

            def save(path, state=reply.state) -> None:
                save_checkpoint(path, state)

            if reporter is not None:
                reporter(EpochEnd(reply.epoch, reply.metrics, reply.is_best, save, model))
            epoch = reply.epoch
        return ray.get(server.finish.remote(member, time.perf_counter() - started))
    finally:
        server.leave.remote(member)  # after finish, a no-op; after a stop or an error, frees the place
