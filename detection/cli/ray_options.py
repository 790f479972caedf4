"""predict's `--engine ray` options (engine.ray_run): where the Ray stages run and what each model
actor reserves. Every other predict option keeps its meaning (--workers: decoding processes of a
single-host run)."""
from __future__ import annotations

import argparse

from detection.engine.ray_run import MISSING_RAY, RaySettings, ray_available


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Ray (--engine ray; pip install 'detection[ray]'; docs/ray.md)")
    group.add_argument("--engine", choices=["local", "ray"], default="local",
                       help="local: this host (torchrun splits it over processes); ray: Ray Data stages on a Ray "
                            "cluster, decoding in CPU tasks, the model on an actor pool")
    group.add_argument("--ray-address", metavar="ADDR",
                       help="join this Ray cluster (auto, HOST:6379, ray://HOST:10001); default: an embedded local "
                            "Ray started for the run")
    group.add_argument("--ray-actors", type=int, metavar="N",
                       help="model actors (each loads the model once); default: min(4, cores) on the embedded local "
                            "Ray, 1 on a cluster")
    group.add_argument("--gpus-per-actor", type=float, default=0.0, metavar="G", help="GPUs each model actor reserves")
    group.add_argument("--cpus-per-actor", type=float, metavar="C",
                       help="CPUs each model actor reserves (its torch threads); default: the cores shared between "
                            "the actors on the embedded local Ray, 1 on a cluster")
    group.add_argument("--ray-decode", choices=["auto", "tasks", "actor"], default="auto",
                       help="where images are decoded: tasks (CPU tasks anywhere in the cluster, handed to the actors "
                            "through the object store), actor (in the model actors, no hand-off: one machine); auto: "
                            "actor on the embedded local Ray, tasks on a cluster (--ray-address)")


def ray_settings_from_args(args: argparse.Namespace) -> RaySettings | None:
    """None for --engine local; ValueError names a bad option, or the missing extra."""
    if args.engine != "ray":
        return None
    if (args.ray_actors is not None and args.ray_actors < 1) or args.gpus_per_actor < 0 or \
            (args.cpus_per_actor is not None and args.cpus_per_actor <= 0):
        raise ValueError("--ray-actors must be >= 1, --gpus-per-actor >= 0 and --cpus-per-actor > 0")
    if not ray_available():
        raise ValueError(MISSING_RAY)
    return RaySettings(address=args.ray_address, actors=args.ray_actors, gpus_per_actor=args.gpus_per_actor,
                       cpus_per_actor=args.cpus_per_actor, decode=args.ray_decode)
