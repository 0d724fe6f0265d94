//! The `stream-credits` binary: parses the command line and hands over.

fn main() -> std::process::ExitCode {
    stream_credits::cli::main()
}
