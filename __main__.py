"""`python -m llmc` is the `llmc` command."""

from llmc.cli import entry

# The guard matters: the build compiles a second package in a spawned process, which imports the
# parent's main module again.
if __name__ == "__main__":
    entry()
