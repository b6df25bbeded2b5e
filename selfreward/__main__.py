from selfreward.cli import app

app()
