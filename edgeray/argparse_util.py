"""argparse that raises UserError (one line, exit 2) instead of printing usage and exiting."""

import argparse

from edgeray.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")
