//! A WASI command component: it exports `wasi:cli/run`, not `weir:plugin`.

fn main() {
    println!("not a weir plugin");
}
