from autol2o.cli import main

main()
