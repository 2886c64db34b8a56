"""The one exception type for problems with the user's input.

Anything the user can fix (a missing file, a dataset that is not COCO, a checkpoint of another
variant, a batch larger than the dataset, ...) raises :class:`InputError` with a message that names
the problem and the fix. ``main.py`` prints such errors as one ``error: ...`` paragraph and exits
with status 1; every other exception is a bug and keeps its traceback.
"""


class InputError(Exception):
    """Bad input from the user: files, data, flags or checkpoints. The message says how to fix it."""

    def __init__(self, message: str = ""):
        super().__init__(_strip_worker_traceback(message, type(self).__name__))


def _strip_worker_traceback(message: str, class_name: str) -> str:
    """The user's message inside a DataLoader worker's re-raise, else ``message`` unchanged.

    A DataLoader re-raises a worker's exception ``X`` as ``X(message)`` with ``message`` = "Caught X in
    DataLoader worker process N.\nOriginal Traceback ...\n<module>.X: <the user's message>"; keeping
    only the last part lets ``main.py`` still print one clean line.
    """
    if not (message.startswith(f"Caught {class_name} in DataLoader worker") and f"{class_name}: " in message):
        return message
    return message.rsplit(f"{class_name}: ", 1)[1].strip()
