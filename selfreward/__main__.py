from selfreward.cli import app

# The guard matters: vLLM starts worker processes by re-importing the main module.
if __name__ == "__main__":
    app()
