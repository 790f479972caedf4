"""Build hook: ship the top-level configs/ and weights/ (the source of truth) inside the wheel.

Everything else is declared in pyproject.toml. The copies land in build/lib/detection/_data/,
where `detection.resources` finds them in an installed wheel; a checkout or an editable install
reads the top-level folders directly, so nothing is copied there.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# (source folder, glob) pairs copied to detection/_data/<same relative path>
SHIPPED = [("configs", "**/*.yaml"), ("weights", "manifest.yaml"), ("weights", "demo/*"), ("weights", "hard/*")]


def shipped_files() -> list[Path]:
    """The repository files that go into detection/_data/ (paths relative to the repo root)."""
    files = set()
    for folder, pattern in SHIPPED:
        found = [p.relative_to(ROOT) for p in (ROOT / folder).glob(pattern) if p.is_file()]
        if not found:  # a wheel without its configs or demo model is the bug this step prevents
            raise FileNotFoundError(f"nothing matches {folder}/{pattern} under {ROOT}")
        files.update(found)
    return sorted(files)


class BuildWithData(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "detection" / "_data"
        for relative in shipped_files():
            destination = target / relative
            self.mkpath(str(destination.parent))
            self.copy_file(str(ROOT / relative), str(destination))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        target = Path(self.build_lib) / "detection" / "_data"
        return outputs + [str(target / relative) for relative in shipped_files()]


setup(cmdclass={"build_py": BuildWithData})
