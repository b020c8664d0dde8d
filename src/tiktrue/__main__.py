from tiktrue.cli import app

app()
