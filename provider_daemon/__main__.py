from provider_daemon.cli import main

main()
