from medhpc.cli.main import run

run()
