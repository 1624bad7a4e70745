"""Turn the hash-locked requirements into pip constraints (name==version ; markers, no hashes)."""

import sys

for line in open(sys.argv[1], encoding="utf-8"):
    line = line.strip()
    if line and not line.startswith(("#", "--")):
        print(line.rstrip("\\").strip())
