"""The one exception type for problems with the user's input.

Anything the user can fix (a missing file, a dataset that is not COCO, a checkpoint of another
variant, a batch larger than the dataset, ...) raises :class:`InputError` with a message that names
the problem and the fix. ``main.py`` prints such errors as one ``error: ...`` paragraph and exits
with status 1; every other exception is a bug and keeps its traceback.
"""


class InputError(Exception):
    """Bad input from the user: files, data, flags or checkpoints. The message says how to fix it."""
