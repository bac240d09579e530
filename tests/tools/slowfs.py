#!/usr/bin/python3
"""A read-only FUSE passthrough of SOURCE at MOUNTPOINT whose reads past
SLOW_FROM bytes wait DELAY seconds, once per open: an executable on a slow
network file system, whose hash takes longer than the agent waits for it.
Runs in the foreground until unmounted (Debian's python3-fusepy)."""

import errno
import os
import sys
import threading
import time

from fusepy import FUSE, FuseOSError, Operations


class Slow(Operations):
    def __init__(self, source, slow_from, delay):
        self.source = source
        self.slow_from = slow_from
        self.delay = delay
        self.slept = set()
        self.mutex = threading.Lock()

    def _path(self, path):
        return os.path.join(self.source, path.lstrip("/"))

    def getattr(self, path, fh=None):
        try:
            st = os.lstat(self._path(path))
        except OSError as error:
            raise FuseOSError(error.errno)
        return {key: getattr(st, key) for key in (
            "st_mode", "st_nlink", "st_uid", "st_gid", "st_size",
            "st_atime", "st_mtime", "st_ctime")}

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._path(path))

    def open(self, path, flags):
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise FuseOSError(errno.EROFS)
        return os.open(self._path(path), os.O_RDONLY)

    def read(self, path, size, offset, fh):
        if offset + size > self.slow_from:
            with self.mutex:
                first = fh not in self.slept
                self.slept.add(fh)
            if first:
                time.sleep(self.delay)
        return os.pread(fh, size, offset)

    def release(self, path, fh):
        with self.mutex:
            self.slept.discard(fh)
        os.close(fh)


if __name__ == "__main__":
    source, mountpoint, slow_from, delay = sys.argv[1:5]
    FUSE(Slow(source, int(slow_from), float(delay)), mountpoint,
         foreground=True, nothreads=False, allow_other=True, ro=True)
