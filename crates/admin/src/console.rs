//! The admin console: `keel admin -c CODE`, `keel admin -f FILE` and the interactive
//! `keel> ` prompt. It is wsadmin's AdminControl on top of the embedded Rhai language.
//!
//! Script API: a global constant `AdminControl` with `queryNames(pattern)` (names joined by
//! "\n"), `invoke(name, op)`, `invoke(name, op, [args])`, `getAttribute(name, attr)` and
//! `getAttributes(name)`; a string method `splitlines()`; `print(x)`.
//!
//! wsadmin scripts end statements with line breaks, Rhai with `;`. So that the seed procedure's
//! lines run as written, a line break ends a statement where Rhai reports a missing `;` at the
//! start of a line (see [`compile_lenient`]).
//!
//! Everything here blocks: each admin call runs on the console's own current-thread tokio
//! runtime, so a [`Console`] must live on a plain thread, never inside an async runtime.

use std::fmt;
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rhai::{
    Array, Dynamic, Engine, EvalAltResult, Module, ParseError, ParseErrorType, Position, Scope, AST,
};
use serde_json::Value;

use crate::{AdminClient, AdminError};

/// Operations one script (or one interactive statement) may run: enough for any admin
/// procedure, small enough that `while true {}` ends within seconds.
pub const MAX_OPERATIONS: u64 = 10_000_000;
/// Nesting of function calls; deeper means runaway recursion.
pub const MAX_CALL_LEVELS: usize = 64;
/// Largest string a script may build (16 MiB).
pub const MAX_STRING_BYTES: usize = 16 << 20;
/// Most items in one array or map.
pub const MAX_ARRAY_ITEMS: usize = 1_000_000;
/// Entries kept in the interactive history file.
pub const HISTORY_MAX_ENTRIES: usize = 1_000;

const PROMPT: &str = "keel> ";
const CONTINUATION_PROMPT: &str = "...> ";

/// Why a console run failed. `Script` carries the position in the operator's text (line and
/// column 1-based; 0 when Rhai cannot tell).
#[derive(Debug)]
pub enum ConsoleError {
    Script {
        source: String,
        line: usize,
        column: usize,
        message: String,
    },
    Admin(AdminError),
    Io(io::Error),
}

// Written by hand: thiserror would take the `source` field for the error's cause.
impl fmt::Display for ConsoleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsoleError::Script {
                source,
                line,
                column,
                message,
            } => {
                write!(f, "{source}: line {line}, column {column}: {message}")
            }
            ConsoleError::Admin(e) => write!(f, "{e}"),
            ConsoleError::Io(e) => write!(f, "admin console: {e}"),
        }
    }
}

impl std::error::Error for ConsoleError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConsoleError::Script { .. } => None,
            ConsoleError::Admin(e) => Some(e),
            ConsoleError::Io(e) => Some(e),
        }
    }
}

impl From<AdminError> for ConsoleError {
    fn from(e: AdminError) -> Self {
        ConsoleError::Admin(e)
    }
}

impl From<io::Error> for ConsoleError {
    fn from(e: io::Error) -> Self {
        ConsoleError::Io(e)
    }
}

type Output = Arc<Mutex<Box<dyn Write + Send>>>;

fn lock(out: &Output) -> MutexGuard<'_, Box<dyn Write + Send>> {
    out.lock().unwrap_or_else(|e| e.into_inner())
}

/// The value scripts see as `AdminControl`. Clones share the client and the runtime.
#[derive(Clone)]
struct AdminControl {
    client: AdminClient,
    runtime: Arc<tokio::runtime::Runtime>,
}

type ScriptResult<T> = Result<T, Box<EvalAltResult>>;

/// An admin error as a Rhai runtime error whose value is the operator sentence; Rhai fills in
/// the position of the call.
fn script_error(e: impl fmt::Display) -> Box<EvalAltResult> {
    EvalAltResult::ErrorRuntime(e.to_string().into(), Position::NONE).into()
}

/// JSON strings become Rhai strings (so `==` and printing work as expected); the rest goes
/// through Rhai's serde bridge (null becomes `()`).
fn to_script(value: Value) -> ScriptResult<Dynamic> {
    match value {
        Value::String(s) => Ok(s.into()),
        other => rhai::serde::to_dynamic(&other),
    }
}

impl AdminControl {
    fn query_names(&mut self, pattern: &str) -> ScriptResult<String> {
        let names = self
            .runtime
            .block_on(self.client.query(pattern))
            .map_err(script_error)?;
        Ok(names.join("\n"))
    }

    fn invoke(&mut self, name: &str, op: &str, args: Array) -> ScriptResult<Dynamic> {
        let args = args
            .iter()
            .enumerate()
            .map(|(i, item)| {
                rhai::serde::from_dynamic::<Value>(item).map_err(|e| {
                    script_error(format!(
                        "argument {} of invoke({name}, {op}) is a {} and cannot be sent to the server: {e}",
                        i + 1,
                        item.type_name()
                    ))
                })
            })
            .collect::<ScriptResult<Vec<Value>>>()?;
        let result = self
            .runtime
            .block_on(self.client.invoke(name, op, args))
            .map_err(script_error)?;
        to_script(result)
    }

    fn get_attribute(&mut self, name: &str, attribute: &str) -> ScriptResult<Dynamic> {
        let value = self
            .runtime
            .block_on(self.client.attribute(name, attribute))
            .map_err(script_error)?;
        to_script(value)
    }

    fn get_attributes(&mut self, name: &str) -> ScriptResult<rhai::Map> {
        let attributes = self
            .runtime
            .block_on(self.client.attributes(name))
            .map_err(script_error)?;
        let mut map = rhai::Map::new();
        for (k, v) in attributes {
            map.insert(k.into(), to_script(v)?);
        }
        Ok(map)
    }
}

/// `"a\nb\n"` → `["a", "b"]`: one element per line, without a trailing empty one, `\r` removed
/// (answers typed on Windows or pasted from one).
fn splitlines(text: &str) -> Array {
    let mut lines: Vec<&str> = text.split('\n').collect();
    if lines.last() == Some(&"") {
        lines.pop();
    }
    lines
        .into_iter()
        .map(|l| Dynamic::from(l.strip_suffix('\r').unwrap_or(l).to_string()))
        .collect()
}

fn build_engine(control: AdminControl, out: Output) -> Engine {
    let mut engine = Engine::new();
    engine.set_max_operations(MAX_OPERATIONS);
    engine.set_max_call_levels(MAX_CALL_LEVELS);
    engine.set_max_string_size(MAX_STRING_BYTES);
    engine.set_max_array_size(MAX_ARRAY_ITEMS);
    engine.set_max_map_size(MAX_ARRAY_ITEMS);

    engine.register_type_with_name::<AdminControl>("AdminControl");
    engine.register_fn("queryNames", AdminControl::query_names);
    engine.register_fn("invoke", |ac: &mut AdminControl, name: &str, op: &str| {
        ac.invoke(name, op, Array::new())
    });
    engine.register_fn("invoke", AdminControl::invoke);
    engine.register_fn("getAttribute", AdminControl::get_attribute);
    engine.register_fn("getAttributes", AdminControl::get_attributes);
    let describe = |ac: &mut AdminControl| format!("AdminControl({})", ac.client.addr());
    engine.register_fn("to_string", describe);
    engine.register_fn("to_debug", describe);
    engine.register_fn("splitlines", splitlines);

    // A variable of a global module, not of the scope: it is visible inside script functions
    // too, and read-only.
    let mut globals = Module::new();
    globals.set_var("AdminControl", control);
    engine.register_global_module(globals.into());

    engine.on_print(move |text| {
        let mut w = lock(&out);
        // Nowhere better to report a broken stdout than by dropping the line.
        let _ = writeln!(w, "{text}");
        let _ = w.flush();
    });
    engine
}

/// What one line typed at the prompt did.
#[derive(Debug)]
enum Feed {
    /// The statement is incomplete: show the continuation prompt.
    NeedMore,
    /// A statement ran (or failed); `Some(text)` is a non-unit result to print.
    Done(Result<Option<String>, ConsoleError>),
    Exit,
}

/// The admin scripting console.
pub struct Console {
    engine: Engine,
    /// One scope for the console's life: variables survive between `run_script` calls and
    /// between interactive lines.
    scope: Scope<'static>,
    /// Script functions defined so far, kept for later statements.
    functions: AST,
    out: Output,
    /// Kept so the console owns the runtime its admin calls run on.
    _runtime: Arc<tokio::runtime::Runtime>,
}

impl Console {
    /// A console whose `AdminControl` talks to `client`. Fails inside an async runtime (each
    /// admin call blocks on the console's own runtime, which tokio forbids there).
    pub fn new(client: AdminClient) -> Result<Console, ConsoleError> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(ConsoleError::Io(io::Error::other(
                "the admin console blocks on every call and cannot run inside an async runtime; create it on a plain thread",
            )));
        }
        let runtime = Arc::new(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        );
        let out: Output = Arc::new(Mutex::new(Box::new(io::stdout())));
        let engine = build_engine(
            AdminControl {
                client,
                runtime: runtime.clone(),
            },
            out.clone(),
        );
        Ok(Console {
            engine,
            scope: Scope::new(),
            functions: AST::empty(),
            out,
            _runtime: runtime,
        })
    }

    /// Sends `print` output and printed results to `out` instead of stdout (for embedding
    /// and tests).
    pub fn with_output(self, out: Box<dyn Write + Send>) -> Console {
        *lock(&self.out) = out;
        self
    }

    /// Runs a whole script (`keel admin -c CODE` / `-f FILE`); `source` names it in errors.
    /// With `print_result` (used for `-c`) a final non-unit value is printed, as wsadmin does.
    pub fn run_script(
        &mut self,
        code: &str,
        source: &str,
        print_result: bool,
    ) -> Result<(), ConsoleError> {
        let value = self.eval(code, source)?;
        if print_result && !value.is_unit() {
            self.print(&value)?;
        }
        Ok(())
    }

    fn print(&self, value: &Dynamic) -> Result<(), ConsoleError> {
        let mut w = lock(&self.out);
        writeln!(w, "{value}")?;
        w.flush()?;
        Ok(())
    }

    fn eval(&mut self, code: &str, source: &str) -> Result<Dynamic, ConsoleError> {
        let ast = compile_lenient(&self.engine, &self.scope, code)
            .map_err(|e| parse_failure(source, &e))?;
        let ast = self.functions.merge(&ast);
        let value = self
            .engine
            .eval_ast_with_scope::<Dynamic>(&mut self.scope, &ast)
            .map_err(|e| eval_failure(source, *e))?;
        // Only after success: a failed statement defines nothing, like it assigns nothing.
        self.functions = ast.clone_functions_only();
        Ok(value)
    }

    /// Interactive console: rustyline editing, history at `history`, `keel> ` prompt and
    /// `...> ` while a statement is incomplete, variables kept between lines, each non-unit
    /// result printed. `exit`, `quit` or Ctrl-D leave; Ctrl-C drops the statement being typed.
    /// Errors are printed and the loop goes on.
    pub fn interactive(&mut self, history: &Path) -> Result<(), ConsoleError> {
        use rustyline::error::ReadlineError;

        let readline_io = |e: ReadlineError| match e {
            ReadlineError::Io(e) => ConsoleError::Io(e),
            other => ConsoleError::Io(io::Error::other(other.to_string())),
        };
        let config = rustyline::Config::builder()
            .max_history_size(HISTORY_MAX_ENTRIES)
            .map_err(readline_io)?
            .history_ignore_dups(true)
            .map_err(readline_io)?
            .auto_add_history(false)
            .build();
        let mut editor = rustyline::DefaultEditor::with_config(config).map_err(readline_io)?;
        match editor.load_history(history) {
            Ok(()) => {}
            Err(ReadlineError::Io(e)) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => eprintln!(
                "admin console: history {} not loaded: {e}",
                history.display()
            ),
        }

        let mut buffer = String::new();
        loop {
            let prompt = if buffer.is_empty() {
                PROMPT
            } else {
                CONTINUATION_PROMPT
            };
            let line = match editor.readline(prompt) {
                Ok(line) => line,
                Err(ReadlineError::Interrupted) => {
                    buffer.clear();
                    continue;
                }
                Err(ReadlineError::Eof) => break,
                Err(e) => {
                    self.save_history(&mut editor, history);
                    return Err(readline_io(e));
                }
            };
            if !line.trim().is_empty() {
                let _ = editor.add_history_entry(line.as_str());
            }
            match self.feed(&mut buffer, &line) {
                Feed::NeedMore => {}
                Feed::Exit => break,
                Feed::Done(Ok(None)) => {}
                Feed::Done(Ok(Some(text))) => {
                    let mut w = lock(&self.out);
                    let _ = writeln!(w, "{text}");
                    let _ = w.flush();
                }
                Feed::Done(Err(e)) => eprintln!("{e}"),
            }
        }
        self.save_history(&mut editor, history);
        Ok(())
    }

    fn save_history(&self, editor: &mut rustyline::DefaultEditor, history: &Path) {
        if let Some(dir) = history.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = editor.save_history(history) {
            eprintln!(
                "admin console: history not saved to {}: {e}",
                history.display()
            );
        }
    }

    /// One line typed at the prompt, appended to `buffer` (the statement so far).
    fn feed(&mut self, buffer: &mut String, line: &str) -> Feed {
        const SOURCE: &str = "<console>";
        if buffer.is_empty() {
            match line.trim().trim_end_matches(';').trim() {
                "exit" | "quit" => return Feed::Exit,
                "" => return Feed::Done(Ok(None)),
                _ => {}
            }
        }
        if !buffer.is_empty() {
            buffer.push('\n');
        }
        buffer.push_str(line);
        let scan = scan(buffer);
        if scan.open_depth > 0 || scan.open_at_end {
            return Feed::NeedMore;
        }
        // A blank line forces evaluation, so a statement Rhai deems incomplete can always be
        // abandoned with its error instead of trapping the operator at `...> `.
        if !line.trim().is_empty() {
            if let Err(e) = compile_lenient(&self.engine, &self.scope, buffer) {
                if matches!(*e.0, ParseErrorType::UnexpectedEOF) {
                    return Feed::NeedMore;
                }
            }
        }
        let statement = std::mem::take(buffer);
        Feed::Done(
            self.eval(&statement, SOURCE)
                .map(|v| (!v.is_unit()).then(|| v.to_string())),
        )
    }
}

fn parse_failure(source: &str, e: &ParseError) -> ConsoleError {
    ConsoleError::Script {
        source: source.to_string(),
        line: e.1.line().unwrap_or(0),
        column: e.1.position().unwrap_or(0),
        message: e.0.to_string(),
    }
}

fn eval_failure(source: &str, e: EvalAltResult) -> ConsoleError {
    let (message, pos) = describe(e);
    ConsoleError::Script {
        source: source.to_string(),
        line: pos.line().unwrap_or(0),
        column: pos.position().unwrap_or(0),
        message,
    }
}

/// The operator sentence and the innermost known position of a runtime error.
fn describe(e: EvalAltResult) -> (String, Position) {
    match e {
        EvalAltResult::ErrorInFunctionCall(function, _, inner, pos) => {
            let (message, inner_pos) = describe(*inner);
            (format!("in function `{function}`: {message}"), if inner_pos.is_none() { pos } else { inner_pos })
        }
        EvalAltResult::ErrorRuntime(ref value, pos) if value.is_string() => (value.to_string(), pos),
        EvalAltResult::ErrorTooManyOperations(pos) => (
            format!("the script was stopped after {MAX_OPERATIONS} operations; it probably loops forever (the limit keeps a runaway script from hanging the console)"),
            pos,
        ),
        EvalAltResult::ErrorStackOverflow(pos) => (
            format!("the script was stopped: function calls nested deeper than {MAX_CALL_LEVELS} levels (runaway recursion?)"),
            pos,
        ),
        EvalAltResult::ErrorDataTooLarge(what, pos) => (
            format!("{what} is larger than the console allows ({MAX_STRING_BYTES} bytes per string, {MAX_ARRAY_ITEMS} items per array or map)"),
            pos,
        ),
        mut other => {
            let pos = other.take_position();
            (other.to_string(), pos)
        }
    }
}

/// Compiles `code`, letting a line break end a statement whose `;` is missing: wsadmin
/// scripts (and the seed procedure) end statements with line breaks.
///
/// When Rhai reports a missing `;` at the first token of a line, a `;` is inserted after the
/// code of the previous non-blank line (before any `//` comment) and compiling is retried, at
/// most once per line. Inserting at the end of a line moves no later position, so errors
/// still point into the operator's text. A missing `;` in the middle of a line stays an error.
pub fn compile_lenient(engine: &Engine, scope: &Scope, code: &str) -> Result<AST, ParseError> {
    let max_repairs = code.split('\n').count();
    let mut text = code.to_string();
    let mut repairs = 0usize;
    loop {
        match engine.compile_with_scope(scope, &text) {
            Ok(ast) => return Ok(ast),
            Err(e) => match repair_missing_semicolon(&text, &e) {
                Some(fixed) if repairs < max_repairs => {
                    assert!(
                        fixed.len() == text.len() + 1,
                        "a repair inserts exactly one `;`"
                    );
                    text = fixed;
                    repairs += 1;
                }
                _ => return Err(e),
            },
        }
    }
}

fn repair_missing_semicolon(code: &str, e: &ParseError) -> Option<String> {
    match e.0.as_ref() {
        ParseErrorType::MissingToken(token, _) if token == ";" => {}
        _ => return None,
    }
    let line = e.1.line()?;
    let column = e.1.position()?;
    let text_line = code.split('\n').nth(line.checked_sub(1)?)?;
    let before: String = text_line.chars().take(column.saturating_sub(1)).collect();
    if !before.trim().is_empty() {
        return None; // Mid-line: two statements on one line really need a `;`.
    }
    let scanned = scan(code);
    let end = (0..line - 1)
        .rev()
        .find_map(|l| scanned.code_end.get(l).copied().flatten())?;
    if code[..end].ends_with(';') {
        return None;
    }
    let mut fixed = String::with_capacity(code.len() + 1);
    fixed.push_str(&code[..end]);
    fixed.push(';');
    fixed.push_str(&code[end..]);
    Some(fixed)
}

/// What a light lexical scan of Rhai text tells: where each line's code ends (comments and
/// trailing blanks excluded), and whether brackets, strings or comments are still open.
struct Scan {
    /// Per line ('\n'-separated): byte offset just past the line's last code character.
    code_end: Vec<Option<usize>>,
    /// Open `{`, `[`, `(` minus closing ones (negative when there are extra closers).
    open_depth: i64,
    /// A string or block comment runs to the end of the text.
    open_at_end: bool,
}

fn scan(code: &str) -> Scan {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        Code,
        LineComment,
        BlockComment(u32),
        Quoted(char),
        Backtick,
    }
    let mut state = State::Code;
    let mut code_end: Vec<Option<usize>> = vec![None];
    let mut open_depth = 0i64;
    let mut chars = code.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let next = chars.peek().map(|(_, n)| *n);
        let end = i + c.len_utf8();
        if c == '\n' {
            if state == State::LineComment {
                state = State::Code;
            }
            code_end.push(None);
            continue;
        }
        let line = code_end.len() - 1;
        match state {
            State::LineComment => {}
            State::Code => match c {
                '/' if next == Some('/') => state = State::LineComment,
                '/' if next == Some('*') => {
                    chars.next();
                    state = State::BlockComment(1);
                }
                c if c.is_whitespace() => {}
                c => {
                    match c {
                        '"' | '\'' => state = State::Quoted(c),
                        '`' => state = State::Backtick,
                        '{' | '[' | '(' => open_depth += 1,
                        '}' | ']' | ')' => open_depth -= 1,
                        _ => {}
                    }
                    code_end[line] = Some(end);
                }
            },
            State::BlockComment(depth) => {
                if c == '*' && next == Some('/') {
                    chars.next();
                    state = if depth == 1 {
                        State::Code
                    } else {
                        State::BlockComment(depth - 1)
                    };
                } else if c == '/' && next == Some('*') {
                    chars.next();
                    state = State::BlockComment(depth + 1);
                }
            }
            State::Quoted(quote) => {
                code_end[line] = Some(end);
                if c == '\\' {
                    // The escaped character belongs to the string, even a line break.
                    if let Some((j, escaped)) = chars.next() {
                        if escaped == '\n' {
                            code_end.push(None);
                        } else {
                            code_end[line] = Some(j + escaped.len_utf8());
                        }
                    }
                } else if c == quote {
                    state = State::Code;
                }
            }
            State::Backtick => {
                if !c.is_whitespace() {
                    code_end[line] = Some(end);
                }
                if c == '`' {
                    state = State::Code;
                }
            }
        }
    }
    let open_at_end = matches!(
        state,
        State::BlockComment(_) | State::Quoted(_) | State::Backtick
    );
    Scan {
        code_end,
        open_depth,
        open_at_end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(code: &str) -> Result<AST, ParseError> {
        compile_lenient(&Engine::new(), &Scope::new(), code)
    }

    fn run(code: &str) -> Dynamic {
        let engine = Engine::new();
        engine.eval_ast::<Dynamic>(&compile(code).unwrap()).unwrap()
    }

    #[test]
    fn line_breaks_end_statements_missing_a_semicolon() {
        let code = "let a = [1]\nlet b = 2   // comment with ; and \"quotes\"\n\n   // only a comment\nb + a[0]";
        assert_eq!(run(code).as_int().unwrap(), 3);
        // Strictly no repair needed: unchanged semantics.
        assert_eq!(run("let a = 1; a + 1").as_int().unwrap(), 2);
    }

    #[test]
    fn repair_goes_before_comments_and_not_into_strings() {
        let code = "let s = \"a // not a comment\"   // real comment\ns";
        assert_eq!(run(code).into_string().unwrap(), "a // not a comment");
        let code = "let s = `multi\nline`\ns";
        assert_eq!(run(code).into_string().unwrap(), "multi\nline");
        let code = "let x = 1 /* block\n comment */\nx";
        assert_eq!(run(code).as_int().unwrap(), 1);
    }

    #[test]
    fn missing_semicolon_mid_line_is_still_an_error() {
        let e = compile("let a = 1 let b = 2").unwrap_err();
        assert!(
            matches!(*e.0, ParseErrorType::MissingToken(ref t, _) if t == ";"),
            "{e}"
        );
        assert_eq!((e.1.line(), e.1.position()), (Some(1), Some(11)));
    }

    #[test]
    fn other_errors_keep_their_position() {
        let e = compile("let a = 1\nlet b = 2\nlet = 3").unwrap_err();
        assert_eq!(e.1.line(), Some(3), "{e}");
    }

    #[test]
    fn scan_tracks_brackets_strings_and_comments() {
        let s = scan("if x {\n  foo(\"}\") // }\n");
        assert_eq!(s.open_depth, 1);
        assert!(!s.open_at_end);
        assert_eq!(s.code_end, vec![Some(6), Some(17), None]);
        assert!(scan("let s = \"abc").open_at_end);
        assert!(scan("/* /* */").open_at_end);
        assert!(!scan("/* /* */ */").open_at_end);
        assert_eq!(scan("a)]").open_depth, -2);
    }

    fn offline_console() -> Console {
        // Nothing listens on port 1; these tests never reach AdminControl.
        let client = AdminClient::new(
            "127.0.0.1:1".parse().unwrap(),
            crate::Credential::new("admin", "x"),
        );
        Console::new(client).unwrap()
    }

    fn done(feed: Feed) -> Option<String> {
        match feed {
            Feed::Done(Ok(v)) => v,
            other => panic!("expected a finished statement, got {other:?}"),
        }
    }

    #[test]
    fn the_prompt_continues_incomplete_statements_and_keeps_variables() {
        let mut c = offline_console();
        let mut buf = String::new();
        assert!(matches!(
            c.feed(&mut buf, "let x = 5"),
            Feed::Done(Ok(None))
        ));
        assert_eq!(done(c.feed(&mut buf, "x * 2")), Some("10".into()));
        // Unbalanced braces: continue until they close; variables from earlier lines are seen.
        assert!(matches!(c.feed(&mut buf, "if x > 1 {"), Feed::NeedMore));
        assert!(matches!(c.feed(&mut buf, ""), Feed::NeedMore));
        assert!(matches!(
            c.feed(&mut buf, "  x + 37   // comment {"),
            Feed::NeedMore
        ));
        assert_eq!(done(c.feed(&mut buf, "}")), Some("42".into()));
        assert!(buf.is_empty());
        // Rhai says "unexpected end": continue.
        assert!(matches!(c.feed(&mut buf, "let y = x +"), Feed::NeedMore));
        assert!(matches!(c.feed(&mut buf, "1"), Feed::Done(Ok(None))));
        assert_eq!(done(c.feed(&mut buf, "y")), Some("6".into()));
        // Functions defined at the prompt stay defined.
        assert!(matches!(
            c.feed(&mut buf, "fn sq(n) { n * n }"),
            Feed::Done(Ok(None))
        ));
        assert_eq!(done(c.feed(&mut buf, "sq(y)")), Some("36".into()));
        // A blank line abandons a statement Rhai still deems incomplete, with its error.
        assert!(matches!(c.feed(&mut buf, "let z ="), Feed::NeedMore));
        match c.feed(&mut buf, "") {
            Feed::Done(Err(ConsoleError::Script {
                line: 2, message, ..
            })) if message.contains("incomplete") => {}
            other => panic!("expected the incomplete statement's error, got {other:?}"),
        }
        // Errors leave the console usable, and the earlier state intact.
        assert!(matches!(
            c.feed(&mut buf, "undefined_thing"),
            Feed::Done(Err(_))
        ));
        assert_eq!(done(c.feed(&mut buf, "sq(x)")), Some("25".into()));
        assert!(matches!(c.feed(&mut buf, "exit"), Feed::Exit));
        assert!(matches!(c.feed(&mut buf, "quit;"), Feed::Exit));
    }

    #[test]
    fn splitlines_drops_the_trailing_empty_line_and_carriage_returns() {
        let strings = |a: Array| {
            a.into_iter()
                .map(|d| d.into_string().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(strings(splitlines("a\r\nb\n")), ["a", "b"]);
        assert_eq!(strings(splitlines("a\n\nb")), ["a", "", "b"]);
        assert!(splitlines("").is_empty());
    }
}
