// Starts `percep lsp` over stdio for .pd files. Everything else (diagnostics, hover,
// completion, definition, outline, formatting, quick fixes) comes from the server.
const vscode = require("vscode");
const { LanguageClient } = require("vscode-languageclient/node");

let client;

function activate(context) {
  const cfg = vscode.workspace.getConfiguration("percep");
  const command = cfg.get("server.command", "percep");
  const args = [...cfg.get("server.extraArgs", []), "lsp"];
  const serverOptions = { command, args };
  const clientOptions = {
    documentSelector: [
      { scheme: "file", language: "percep" },
      { scheme: "untitled", language: "percep" },
    ],
    initializationOptions: { debounceMs: cfg.get("debounceMs", 75) },
  };
  client = new LanguageClient("percep", "percep language server", serverOptions, clientOptions);
  context.subscriptions.push(
    vscode.commands.registerCommand("percep.restartServer", () => client.restart())
  );
  return client.start();
}

function deactivate() {
  return client ? client.stop() : undefined;
}

module.exports = { activate, deactivate };
