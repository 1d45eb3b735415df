from ladd.cli import entry

entry()
