"""gppy-stage: the 7DT / IMSNG imaging pipeline as staged batch jobs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gppy-stage")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+src"
