"""The edge: the `vmshare` command. One module per command group (argument
parsing, printing, exit codes), registered in ``main.GROUPS``; ``context``
holds what every command needs and the only writers to the terminal.

May import every other vmshare package; nothing outside ``cli`` imports it.
"""
