//! Passwords in `amqp.url` and `database.url`, before the host or in a
//! `password` query parameter, appear in no output of the binary, at log
//! level `debug`, in text and in JSON logs.
//!
//! Both URLs point at port 1 on the loopback address, where nothing
//! listens, so every command fails to connect and reports the URL. No
//! broker or database is needed.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

const AMQP_PASSWORD: &str = "SECRETPW1";
const DATABASE_PASSWORD: &str = "SECRETPW2";
const QUERY_PASSWORD: &str = "SECRETPW3";

const AMQP_URL: &str = "amqp://guest:SECRETPW1@127.0.0.1:1/%2f";
const DATABASE_URL: &str = "postgres://root:SECRETPW2@127.0.0.1:1/x";

const AMQP_URL_REDACTED: &str = "amqp://guest:***@127.0.0.1:1/%2f";
const DATABASE_URL_REDACTED: &str = "postgres://root:***@127.0.0.1:1/x";

/// sqlx reads the password from the query when the URL has none before
/// the host.
const QUERY_URL: &str = "postgres://root@127.0.0.1:1/x?application_name=sc&password=SECRETPW3";
const QUERY_URL_REDACTED: &str = "postgres://root@127.0.0.1:1/x?application_name=sc&password=***";

/// Maximum wait for a command to fail, or for the worker to log its first
/// failed attempt. A refused loopback connection fails at once, but a debug
/// build spends a few seconds building the tiktoken encoders first.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the worker keeps retrying after its first failed attempt
/// before it is killed. Retries come after about 0.2, 0.6 and 1.4 seconds.
const RUN_DURATION: Duration = Duration::from_secs(3);

const POLL: Duration = Duration::from_millis(50);

/// What one run of the binary wrote.
struct Output {
    stdout: String,
    stderr: String,
    /// `None` when the process was killed.
    exit_code: Option<i32>,
}

/// A running binary whose stdout and stderr go to files in a directory of
/// its own. The directory has no `stream-credits.toml`, so only the
/// environment sets the URLs.
struct Run {
    child: Child,
    directory: PathBuf,
}

impl Run {
    fn start(args: &[&str], log_format: &str, database_url: &str) -> Self {
        // Tests run in parallel, and several run the same command.
        static RUNS: AtomicUsize = AtomicUsize::new(0);
        let run = RUNS.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}-{log_format}-{run}", args.join("-"));
        let directory =
            std::env::temp_dir().join(format!("sc-secrets-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&directory).expect("create a temporary directory");
        let log = |file: &str| File::create(directory.join(file)).expect("create a log file");
        let child = Command::new(env!("CARGO_BIN_EXE_stream-credits"))
            .args(args)
            .current_dir(&directory)
            .env_remove("RUST_LOG")
            .env("STREAM_CREDITS__AMQP__URL", AMQP_URL)
            .env("STREAM_CREDITS__DATABASE__URL", database_url)
            .env("STREAM_CREDITS__LOG__LEVEL", "debug")
            .env("STREAM_CREDITS__LOG__FORMAT", log_format)
            .env("STREAM_CREDITS__HTTP__LISTEN", "")
            .stdin(Stdio::null())
            .stdout(log("stdout.log"))
            .stderr(log("stderr.log"))
            .spawn()
            .expect("start the stream-credits binary");
        Self { child, directory }
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("poll the binary").is_none()
    }

    fn stderr(&self) -> String {
        read_lossy(&self.directory.join("stderr.log"))
    }

    /// Waits until `ready` returns true or the process exits, for at most
    /// [`START_TIMEOUT`]. Returns the last result of `ready`.
    fn wait_for(&mut self, ready: impl Fn(&mut Self) -> bool) -> bool {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if ready(self) {
                return true;
            }
            if !self.is_running() {
                return ready(self);
            }
            sleep(POLL);
        }
        false
    }

    /// Kills the process if it still runs and returns what it wrote.
    fn finish(mut self) -> Output {
        let _ = self.child.kill();
        let status = self.child.wait().expect("wait for the binary");
        let output = Output {
            stdout: read_lossy(&self.directory.join("stdout.log")),
            stderr: self.stderr(),
            exit_code: status.code(),
        };
        let _ = std::fs::remove_dir_all(&self.directory);
        output
    }
}

fn read_lossy(path: &Path) -> String {
    let bytes = std::fs::read(path).expect("read a log file");
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Runs a command that ends by itself and returns its output.
fn run_to_end(args: &[&str], log_format: &str, database_url: &str) -> Output {
    let mut run = Run::start(args, log_format, database_url);
    let exited = run.wait_for(|run| !run.is_running());
    let output = run.finish();
    assert!(
        exited,
        "`{}` did not exit within {START_TIMEOUT:?}; stderr:\n{}",
        args.join(" "),
        output.stderr
    );
    output
}

/// Runs the worker until it has logged a failed attempt and retried for
/// [`RUN_DURATION`], then kills it.
fn run_worker(log_format: &str, database_url: &str, redacted_url: &str) -> Output {
    let mut run = Run::start(&["run"], log_format, database_url);
    let attempted = run.wait_for(|run| run.stderr().contains(redacted_url));
    if attempted {
        sleep(RUN_DURATION);
    }
    let still_running = run.is_running();
    let output = run.finish();
    assert!(
        attempted,
        "the worker logged no failed attempt within {START_TIMEOUT:?}; stderr:\n{}",
        output.stderr
    );
    assert!(
        still_running,
        "the worker exited instead of retrying; stderr:\n{}",
        output.stderr
    );
    output
}

/// Checks that neither password is in the output and that stderr names
/// the URL the command failed on, redacted.
fn assert_redacted(command: &str, output: &Output, redacted_url: &str) {
    for password in [AMQP_PASSWORD, DATABASE_PASSWORD, QUERY_PASSWORD] {
        assert!(
            !output.stdout.contains(password),
            "`{command}` printed a password on stdout:\n{}",
            output.stdout
        );
        assert!(
            !output.stderr.contains(password),
            "`{command}` printed a password on stderr:\n{}",
            output.stderr
        );
    }
    assert!(
        output.stderr.contains(redacted_url),
        "`{command}` stderr does not name {redacted_url}:\n{}",
        output.stderr
    );
}

fn check_failing_commands(log_format: &str) {
    let commands: [(&[&str], &str); 3] = [
        (&["migrate"], DATABASE_URL_REDACTED),
        (&["account", "show", "u", "--json"], DATABASE_URL_REDACTED),
        (&["dlq", "list"], AMQP_URL_REDACTED),
    ];
    for (args, redacted_url) in commands {
        let command = args.join(" ");
        let output = run_to_end(args, log_format, DATABASE_URL);
        assert_eq!(
            output.exit_code,
            Some(1),
            "`{command}` should fail to connect; stderr:\n{}",
            output.stderr
        );
        assert_redacted(&command, &output, redacted_url);
    }
}

#[test]
fn commands_hide_passwords_in_text_logs() {
    check_failing_commands("text");
}

#[test]
fn commands_hide_passwords_in_json_logs() {
    check_failing_commands("json");
}

#[test]
fn worker_hides_passwords_in_text_logs() {
    let output = run_worker("text", DATABASE_URL, DATABASE_URL_REDACTED);
    assert_redacted("run", &output, DATABASE_URL_REDACTED);
}

#[test]
fn worker_hides_passwords_in_json_logs() {
    let output = run_worker("json", DATABASE_URL, DATABASE_URL_REDACTED);
    assert_redacted("run", &output, DATABASE_URL_REDACTED);
}

#[test]
fn query_password_hidden_in_command_errors() {
    for log_format in ["text", "json"] {
        let args = ["account", "show", "u"];
        let output = run_to_end(&args, log_format, QUERY_URL);
        assert_eq!(
            output.exit_code,
            Some(1),
            "`account show` should fail to connect; stderr:\n{}",
            output.stderr
        );
        assert_redacted("account show", &output, QUERY_URL_REDACTED);
    }
}

#[test]
fn query_password_hidden_in_worker_logs() {
    for log_format in ["text", "json"] {
        let output = run_worker(log_format, QUERY_URL, QUERY_URL_REDACTED);
        assert_redacted("run", &output, QUERY_URL_REDACTED);
    }
}

/// sqlx logs the value of a query parameter it does not read, so the
/// binary rejects such a parameter before connecting.
#[test]
fn unread_query_password_rejected_unshown() {
    let url = "postgres://root@127.0.0.1:1/x?sslpassword=SECRETPW3";
    let output = run_to_end(&["account", "show", "u"], "text", url);
    assert_eq!(output.exit_code, Some(2), "stderr:\n{}", output.stderr);
    assert!(
        output.stderr.contains("database.url"),
        "stderr does not name the setting:\n{}",
        output.stderr
    );
    assert!(
        output.stderr.contains("`sslpassword`"),
        "stderr does not name the parameter:\n{}",
        output.stderr
    );
    assert!(
        !output.stderr.contains(QUERY_PASSWORD),
        "stderr shows the password:\n{}",
        output.stderr
    );
}
