"""Entry point of a parity worker process: ``python -m fusedattn.parity.worker JOB RESULTS``
(see fusedattn.parity.isolation). A module of its own, so that running it does not
re-execute a module the package already imported."""

import sys

from .isolation import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
