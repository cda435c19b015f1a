"""Run ``medfm tune`` in its own process: ``python -m MedFMTrainLib.tune_cli [tune options]``.

Made for the Slicer module, which launches it as a subprocess: progress is JSON lines on stdout
(``{"progress": f, "message": m}``), then ``{"result": {...}}``, or ``{"error": m}`` (exit status 2)
or ``{"cancelled": m}`` (exit status 3). SIGTERM / SIGINT stop the work at the next encode or
training step; no adapter folder is written or changed (saves are atomic, see ``store``).
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import List, Optional

from MedFMSegmentLib.errors import Cancelled, MedFMError

from .cli import add_tune_arguments, emit, run_tune

EXIT_OK, EXIT_ERROR, EXIT_CANCELLED = 0, 2, 3


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MedFMTrainLib.tune_cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tune_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.set_defaults(progress="json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def on_signal(signum, frame):  # noqa: ARG001
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return run_tune(args, should_stop=stop.is_set)
    except Cancelled as exc:
        emit({"cancelled": str(exc)})
        return EXIT_CANCELLED
    except (MedFMError, ValueError, OSError) as exc:
        emit({"error": str(exc)})
        return EXIT_ERROR
    except Exception as exc:  # a bug: one clear line, not a traceback on the Slicer side
        logging.getLogger(__name__).debug("internal error", exc_info=True)
        emit({"error": f"internal error ({type(exc).__name__}: {str(exc)[:300]}); no adapter was written"})
        return EXIT_ERROR
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
