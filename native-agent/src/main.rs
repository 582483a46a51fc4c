//! `switchyard`: the command line. The commands live in the library ([`switchyard_agent::cli`]);
//! this wires standard streams and the exit status: 0 for any verdict, 2 for bad input.

use std::io::{self, Write};
use std::process::ExitCode;

use clap::Parser;
use switchyard_agent::cli::{self, Cli};

fn main() -> ExitCode {
    // clap prints usage errors itself and exits 2, as the contract asks for bad arguments.
    let args = Cli::parse();
    let mut out = io::BufWriter::new(io::stdout().lock());
    // Not locked: the agent and the lab print from threads of their own.
    let mut err = io::stderr();
    let result = cli::run(args, &mut out, &mut err).and_then(|()| out.flush().map_err(cli::Error::Output));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
        Err(e) => {
            for line in e.lines() {
                let _ = writeln!(err, "error: {line}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}
