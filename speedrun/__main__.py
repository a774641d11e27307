import sys

from speedrun.cli import main

if __name__ == "__main__":
    sys.exit(main())
