"""The project's exception types: the line between the user's problems and our bugs.

A `PixelDiTError` is something the person running the command can fix (a config value, a
path, credentials, an unreachable endpoint, a weights file, bad data). The command line
prints it as one line naming the problem and the fix, with the traceback behind `--debug`
or `PIXELDIT_DEBUG=1`. Anything else is a bug and keeps its traceback.

The subclasses keep the builtin they replaced as a second base (ValueError,
FileNotFoundError, ...) so that callers who caught the builtin still do.
"""

from __future__ import annotations


class PixelDiTError(Exception):
    """A problem the user can fix. The message names the file, key, URL or field, and the fix."""

    def __str__(self):
        # the message as written: KeyError would quote it, OSError would prefix an errno
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class ConfigError(PixelDiTError, ValueError):
    """A bad config key or value; the message starts with the key path."""


class DataError(PixelDiTError, ValueError):
    """Data that cannot be used as it is: a manifest, a shard, a label, a class count."""


class MissingFileError(PixelDiTError, FileNotFoundError):
    """A file or folder the user named (or a command expects) is not there."""


class CheckpointError(PixelDiTError):
    """A run directory or checkpoint that cannot be resumed or exported as it is."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """No checkpoint where one was named or expected (a missing meta.json, part or DeepSpeed tag)."""


class WeightsError(PixelDiTError, ValueError, KeyError):
    """A weights file (DINOv2, Inception, an export, the authors' .ckpt) that cannot be loaded."""


class LaunchError(PixelDiTError, ValueError):
    """A launch layout (nodes, processes, hostfile, batch) that cannot work."""


class TrainingDiverged(PixelDiTError, RuntimeError):
    """Training stopped by its non-finite guard: the last checkpoint is intact; the message says what to change."""
