import sys
from pathlib import Path

# Tests import the project (main, models, util) and the helpers next to them (reference).
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
