"""Fails at every start, through torch.distributed.elastic's @record so that the
error file holds the traceback."""
import os

from torch.distributed.elastic.multiprocessing.errors import record


@record
def main():
    raise RuntimeError("flashrun test failure on rank %s" % os.environ.get("RANK"))


if __name__ == "__main__":
    main()
