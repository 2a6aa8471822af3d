"""The caller's uid: the only door into the queue."""
