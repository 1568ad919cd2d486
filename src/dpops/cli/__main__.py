"""``python -m dpops.cli``."""

from dpops.cli.app import main

if __name__ == "__main__":
    main()
