from mixbuild.cli import main

main(prog_name="mixbuild")
