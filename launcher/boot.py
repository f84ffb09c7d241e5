"""How a process of ours starts: the `launch` command (and `python -m launcher`), and each worker the agent
starts (`python -m launcher.boot`), their imports made with the garbage collector paused (processes/collector.py). An
entry: no module imports it."""

from .processes import collector


def launch() -> None:
    collector.pause()
    from .cli.commands import main

    main()


if __name__ == "__main__":
    collector.pause()
    from .processes.worker import main

    main()
