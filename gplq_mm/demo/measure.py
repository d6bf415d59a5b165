"""Run one command, report its wall time and peak memory as JSON.

    python -m gplq_mm.demo.measure OUT.json LOG.txt -- CMD [ARGS...]

Peak memory is the child's peak resident set size (``getrusage`` of the only
child this process waits for), so each measured stage is reported on its own
and cannot inherit another stage's allocations.
"""
import json
import resource
import subprocess
import sys
import time


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 4 or argv[2] != '--':
        sys.stderr.write(__doc__)
        return 2
    out_json, log_path, cmd = argv[0], argv[1], argv[3:]
    t0 = time.time()
    with open(log_path, 'w') as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.time() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with open(out_json, 'w') as f:
        json.dump(dict(cmd=cmd, returncode=proc.returncode, seconds=seconds,
                       peak_rss_mib=peak_kib / 1024), f, indent=1)
    return proc.returncode


if __name__ == '__main__':
    sys.exit(main())
